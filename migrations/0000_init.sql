CREATE TABLE "api_keys" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"key_hash" text NOT NULL,
	"prefix" text NOT NULL,
	"name" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"revoked_at" timestamp with time zone,
	CONSTRAINT "api_keys_key_hash_unique" UNIQUE("key_hash")
);
--> statement-breakpoint
CREATE TABLE "events" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"tenant_id" text,
	"instance_id" text,
	"host_id" text,
	"type" text NOT NULL,
	"data" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "hosts" (
	"id" text PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"token_hash" text NOT NULL,
	"status" text DEFAULT 'offline' NOT NULL,
	"driver" text,
	"agent_version" text,
	"capabilities" jsonb,
	"vcpus" integer DEFAULT 0 NOT NULL,
	"memory_bytes" bigint DEFAULT 0 NOT NULL,
	"last_seen_at" timestamp with time zone,
	"connected_at" timestamp with time zone,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "hosts_name_unique" UNIQUE("name"),
	CONSTRAINT "hosts_token_hash_unique" UNIQUE("token_hash")
);
--> statement-breakpoint
CREATE TABLE "instances" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"host_id" text NOT NULL,
	"name" text NOT NULL,
	"image" text NOT NULL,
	"hypervisor" text NOT NULL,
	"state" text NOT NULL,
	"state_error" text,
	"vcpus" integer NOT NULL,
	"memory_bytes" bigint NOT NULL,
	"hotplug_bytes" bigint DEFAULT 0 NOT NULL,
	"overlay_bytes" bigint NOT NULL,
	"disk_io_bps" bigint,
	"env" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"tags" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"entrypoint" jsonb,
	"cmd" jsonb,
	"network_enabled" boolean NOT NULL,
	"ip" text,
	"mac" text,
	"bandwidth_download_bps" bigint,
	"bandwidth_upload_bps" bigint,
	"volumes" jsonb DEFAULT '[]'::jsonb NOT NULL,
	"has_snapshot" boolean DEFAULT false NOT NULL,
	"exit_code" integer,
	"exit_message" text,
	"forked_from" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"started_at" timestamp with time zone,
	"stopped_at" timestamp with time zone,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"version" integer DEFAULT 1 NOT NULL
);
--> statement-breakpoint
CREATE TABLE "operations" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text,
	"host_id" text NOT NULL,
	"parent_id" text,
	"step" text,
	"instance_id" text,
	"source_instance_id" text,
	"kind" text NOT NULL,
	"lock" text NOT NULL,
	"status" text DEFAULT 'pending' NOT NULL,
	"payload" jsonb NOT NULL,
	"observed" jsonb,
	"error" jsonb,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"completed_at" timestamp with time zone
);
--> statement-breakpoint
CREATE TABLE "tenants" (
	"id" text PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "tenants_name_unique" UNIQUE("name")
);
--> statement-breakpoint
ALTER TABLE "api_keys" ADD CONSTRAINT "api_keys_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "instances" ADD CONSTRAINT "instances_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "instances" ADD CONSTRAINT "instances_host_id_hosts_id_fk" FOREIGN KEY ("host_id") REFERENCES "public"."hosts"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "api_keys_tenant_idx" ON "api_keys" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "events_instance_idx" ON "events" USING btree ("instance_id","id");--> statement-breakpoint
CREATE UNIQUE INDEX "instances_tenant_name_uq" ON "instances" USING btree ("tenant_id","name");--> statement-breakpoint
CREATE UNIQUE INDEX "instances_host_ip_uq" ON "instances" USING btree ("host_id","ip") WHERE "instances"."ip" is not null;--> statement-breakpoint
CREATE UNIQUE INDEX "instances_mac_uq" ON "instances" USING btree ("mac") WHERE "instances"."mac" is not null;--> statement-breakpoint
CREATE INDEX "instances_host_idx" ON "instances" USING btree ("host_id");--> statement-breakpoint
CREATE INDEX "instances_id_prefix_idx" ON "instances" USING btree ("id" text_pattern_ops);--> statement-breakpoint
CREATE INDEX "instances_tenant_state_idx" ON "instances" USING btree ("tenant_id","state");--> statement-breakpoint
CREATE INDEX "operations_pending_host_idx" ON "operations" USING btree ("host_id","created_at") WHERE "operations"."status" = 'pending';--> statement-breakpoint
CREATE INDEX "operations_pending_instance_idx" ON "operations" USING btree ("instance_id") WHERE "operations"."status" = 'pending';--> statement-breakpoint
CREATE INDEX "operations_pending_source_idx" ON "operations" USING btree ("source_instance_id") WHERE "operations"."status" = 'pending';--> statement-breakpoint
CREATE UNIQUE INDEX "operations_parent_step_uq" ON "operations" USING btree ("parent_id","step") WHERE "operations"."parent_id" is not null;