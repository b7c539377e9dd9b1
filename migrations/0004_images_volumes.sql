CREATE TABLE "images" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"name" text NOT NULL,
	"status" text NOT NULL,
	"error" text,
	"platform" text NOT NULL,
	"digest" text,
	"size_bytes" bigint,
	"entrypoint" jsonb,
	"cmd" jsonb,
	"env" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"working_dir" text,
	"tags" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"host_id" text,
	"operation_id" text,
	"bytes_done" bigint DEFAULT 0 NOT NULL,
	"bytes_total" bigint DEFAULT 0 NOT NULL,
	"credentials_hash" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"requested_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "volume_archive_chunks" (
	"archive_id" text NOT NULL,
	"seq" integer NOT NULL,
	"data" "bytea" NOT NULL,
	CONSTRAINT "volume_archive_chunks_archive_id_seq_pk" PRIMARY KEY("archive_id","seq")
);
--> statement-breakpoint
CREATE TABLE "volumes" (
	"key" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"id" text NOT NULL,
	"name" text NOT NULL,
	"size_bytes" bigint NOT NULL,
	"tags" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"host_id" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "hosts" ADD COLUMN "image_digests" jsonb DEFAULT '[]'::jsonb NOT NULL;--> statement-breakpoint
ALTER TABLE "instances" ADD COLUMN "image_digest" text;--> statement-breakpoint
ALTER TABLE "instances" ADD COLUMN "image_id" text;--> statement-breakpoint
ALTER TABLE "images" ADD CONSTRAINT "images_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "images" ADD CONSTRAINT "images_host_id_hosts_id_fk" FOREIGN KEY ("host_id") REFERENCES "public"."hosts"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "volumes" ADD CONSTRAINT "volumes_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "volumes" ADD CONSTRAINT "volumes_host_id_hosts_id_fk" FOREIGN KEY ("host_id") REFERENCES "public"."hosts"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "images_tenant_name_uq" ON "images" USING btree ("tenant_id","name");--> statement-breakpoint
CREATE INDEX "images_host_status_idx" ON "images" USING btree ("host_id","status");--> statement-breakpoint
CREATE UNIQUE INDEX "volumes_tenant_id_uq" ON "volumes" USING btree ("tenant_id","id");--> statement-breakpoint
ALTER TABLE "instances" ADD CONSTRAINT "instances_image_id_images_id_fk" FOREIGN KEY ("image_id") REFERENCES "public"."images"("id") ON DELETE no action ON UPDATE no action;