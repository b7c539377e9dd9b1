-- Each host owns a guest subnet: a /20 of 10.64.0.0/10 (control-plane/src/services/network.ts).
ALTER TABLE "hosts" ADD COLUMN "subnet" "cidr";--> statement-breakpoint
-- Hosts registered before get consecutive blocks in the order they were registered.
UPDATE "hosts" SET "subnet" = set_masklen('10.64.0.0'::inet + b.k * 4096, 20)::cidr
  FROM (SELECT "id", row_number() OVER (ORDER BY "created_at", "id") - 1 AS k FROM "hosts") b
  WHERE "hosts"."id" = b."id";--> statement-breakpoint
-- Their guests' addresses were all in 10.100.0.0/16: each keeps its offset inside its host's
-- subnet. A host with over 4,093 guests cannot be moved so: the migration stops, naming it.
DO $$
DECLARE h text;
BEGIN
  SELECT "host_id" INTO h FROM "instances"
    WHERE "ip" IS NOT NULL AND "ip"::inet - '10.100.0.0'::inet NOT BETWEEN 2 AND 4094 LIMIT 1;
  IF h IS NOT NULL THEN
    RAISE EXCEPTION 'host % has a guest address past the first 4,093 of 10.100.0.0/16', h;
  END IF;
END $$;--> statement-breakpoint
UPDATE "instances" SET "ip" = host(network(h."subnet") + ("instances"."ip"::inet - '10.100.0.0'::inet))
  FROM "hosts" h
  WHERE h."id" = "instances"."host_id" AND "instances"."ip" IS NOT NULL;--> statement-breakpoint
ALTER TABLE "hosts" ALTER COLUMN "subnet" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "hosts" ADD CONSTRAINT "hosts_subnet_no_overlap" EXCLUDE USING gist ("subnet" inet_ops WITH &&);
