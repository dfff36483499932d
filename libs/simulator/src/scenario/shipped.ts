/** The scenarios shipped with the simulator (`libs/simulator/scenarios/*.yaml`). */
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';

export const SHIPPED_SCENARIOS_DIR = fileURLToPath(new URL('../../scenarios/', import.meta.url));

/** Absolute paths of the shipped scenario files, sorted. */
export function shippedScenarioFiles(): string[] {
  return readdirSync(SHIPPED_SCENARIOS_DIR)
    .filter((f) => f.endsWith('.yaml'))
    .sort()
    .map((f) => join(SHIPPED_SCENARIOS_DIR, f));
}
