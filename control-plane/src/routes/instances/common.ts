import { Instance } from "@offshoot/shared";
import { json } from "../common.ts";

/** A success answer carrying the instance as the verb left it. */
export const instanceOk = (description: string) => ({ description, content: json(Instance) });
