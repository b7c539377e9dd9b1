CREATE TABLE "snapshot_schedules" (
	"instance_id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"interval" text NOT NULL,
	"interval_ms" bigint NOT NULL,
	"name_prefix" text,
	"metadata" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"max_count" bigint,
	"max_age" text,
	"max_age_ms" bigint,
	"next_run_at" timestamp with time zone NOT NULL,
	"last_run_at" timestamp with time zone,
	"last_snapshot_id" text,
	"last_error" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone NOT NULL
);
--> statement-breakpoint
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
	"scheduled" boolean DEFAULT false NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "hosts" ADD COLUMN "memory_available_bytes" bigint;--> statement-breakpoint
ALTER TABLE "hosts" ADD COLUMN "memory_reported_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "instances" ADD COLUMN "memory_charge_bytes" bigint;--> statement-breakpoint
ALTER TABLE "snapshot_schedules" ADD CONSTRAINT "snapshot_schedules_instance_id_instances_id_fk" FOREIGN KEY ("instance_id") REFERENCES "public"."instances"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "snapshot_schedules" ADD CONSTRAINT "snapshot_schedules_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "snapshots" ADD CONSTRAINT "snapshots_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "snapshots" ADD CONSTRAINT "snapshots_host_id_hosts_id_fk" FOREIGN KEY ("host_id") REFERENCES "public"."hosts"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "snapshot_schedules_due_idx" ON "snapshot_schedules" USING btree ("next_run_at");--> statement-breakpoint
CREATE UNIQUE INDEX "snapshots_source_name_uq" ON "snapshots" USING btree ("tenant_id","source_instance_id","name") WHERE "snapshots"."name" is not null;--> statement-breakpoint
CREATE INDEX "snapshots_tenant_created_idx" ON "snapshots" USING btree ("tenant_id","created_at");