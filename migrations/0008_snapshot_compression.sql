ALTER TABLE "snapshots" ADD COLUMN "compression" jsonb;--> statement-breakpoint
ALTER TABLE "snapshots" ADD COLUMN "compression_state" text DEFAULT 'none' NOT NULL;--> statement-breakpoint
ALTER TABLE "snapshots" ADD COLUMN "compression_error" text;--> statement-breakpoint
ALTER TABLE "snapshots" ADD COLUMN "compressed_size_bytes" bigint;--> statement-breakpoint
ALTER TABLE "snapshots" ADD COLUMN "uncompressed_size_bytes" bigint;