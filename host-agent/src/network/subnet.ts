// IPv4 subnets as the control plane hands them to a host ("10.64.16.0/20"): the gateway is the
// first host address, held by the bridge.

export interface Subnet {
  /** Normalised "a.b.c.d/len" (the network address). */
  cidr: string;
  network: string;
  prefixLength: number;
  /** The first host address: the bridge's, the guests' default route. */
  gateway: string;
  /** Last host address (below the broadcast address). */
  lastHost: string;
}

/** /30 is the smallest with a gateway and one guest; /8 the largest this module accepts. */
export const MIN_PREFIX = 8;
export const MAX_PREFIX = 30;

export function parseSubnet(input: string): Subnet {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(input.trim());
  const octets = m ? m.slice(1, 5).map(Number) : [];
  const len = m ? Number(m[5]) : Number.NaN;
  if (!m || octets.some((o) => o > 255) || !(len >= MIN_PREFIX && len <= MAX_PREFIX)) {
    throw new RangeError(
      `invalid guest subnet "${input}": expected IPv4 CIDR a.b.c.d/len with len ${MIN_PREFIX}–${MAX_PREFIX}`,
    );
  }
  const addr = octets.reduce((a, o) => a * 256 + o, 0);
  const size = 2 ** (32 - len);
  if (addr % size !== 0) {
    throw new RangeError(
      `invalid guest subnet "${input}": host bits set (the network is ${ipv4(addr - (addr % size))}/${len})`,
    );
  }
  return {
    cidr: `${ipv4(addr)}/${len}`,
    network: ipv4(addr),
    prefixLength: len,
    gateway: ipv4(addr + 1),
    lastHost: ipv4(addr + size - 2),
  };
}

function ipv4(n: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join(".");
}
