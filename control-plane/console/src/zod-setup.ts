// The API's schemas (shared/) check input in the console too, without compiling code at run
// time: the page's Content-Security-Policy forbids eval, and zod would otherwise try it.
import { config } from "zod";

config({ jitless: true });
