import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { commands, events, renderProtocolDoc, unconfirmedChoices } from '@periscope/kvmi';

const doc = join(dirname(fileURLToPath(import.meta.url)), '../../../docs/protocol.md');

describe('docs/protocol.md', () => {
  it('is current with the catalog (regenerate with `npm run docs:protocol`)', () => {
    expect(readFileSync(doc, 'utf8')).toBe(renderProtocolDoc());
  });
  it('lists every command, event and UNCONFIRMED choice', () => {
    const text = renderProtocolDoc();
    for (const c of Object.values(commands)) expect(text).toContain(`| ${c.id} | ${c.name}`);
    for (const e of Object.values(events)) expect(text).toContain(`| ${e.id} | ${e.name}`);
    for (const u of unconfirmedChoices) expect(text).toContain(`\`${u.key}\``);
  });
});
