CREATE TABLE "snapshots" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"host_id" text NOT NULL,
	"name" text,
	"kind" text NOT NULL,
	"tags" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"source_instance_id" text NOT NULL,
	"source_instance_name" text NOT NULL,
	"source_hypervisor" text NOT NULL,
	"source" jsonb NOT NULL,
	"status" text DEFAULT 'creating' NOT NULL,
	"size_bytes" bigint DEFAULT 0 NOT NULL,
	"operation_id" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "snapshots" ADD CONSTRAINT "snapshots_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "snapshots" ADD CONSTRAINT "snapshots_host_id_hosts_id_fk" FOREIGN KEY ("host_id") REFERENCES "public"."hosts"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "snapshots_source_name_uq" ON "snapshots" USING btree ("tenant_id","source_instance_id","name") WHERE "snapshots"."name" is not null;--> statement-breakpoint
CREATE INDEX "snapshots_tenant_created_idx" ON "snapshots" USING btree ("tenant_id","created_at");