/**
 * The detection spool on a real directory: a detection is sendable only once its file is in place
 * (write-then-send, so a kill -9 of the agent never loses one analysis has not stored), a detection being
 * completed (the instruction read after the reply) is on disk at once but held back until `update`, an
 * acknowledgement racing the write leaves no file, and a restart loads what is there and removes the
 * temporary files an interrupted write left.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Detection, Severity } from '@periscope/contracts';
import { DetectionSpool } from '../../src/link/spool.js';

const dirs: string[] = [];
afterEach(() => {
  while (dirs.length) rmSync(dirs.pop()!, { recursive: true, force: true });
});

function spoolDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'ha-spool-'));
  dirs.push(d);
  return join(d, 'spool');
}

function detection(id: string, text = ''): Detection {
  return Detection.fromPartial({
    detectionId: id, hostId: 'spool-host', vmUuid: Buffer.alloc(16, 7), sessionGeneration: 3n, vcpu: 1, ruleId: 'cr0-wp-clear',
    severity: Severity.SEVERITY_HIGH, summary: 'test', eventSeqs: [9], detectedUnixNs: 1n, instructionText: text,
  });
}

const onDisk = (dir: string, id: string): Detection | undefined => (existsSync(join(dir, `${id}.pb`)) ? Detection.decode(readFileSync(join(dir, `${id}.pb`))) : undefined);
const unsentIds = (s: DetectionSpool, stream = 1): string[] => [...s.unsent(stream)].map((e) => e.id);

describe('detection spool', () => {
  it('a detection is sendable only once its file is in place; the file is what gets sent', async () => {
    const dir = spoolDir();
    const ready: string[] = [];
    let s: DetectionSpool | undefined;
    s = new DetectionSpool(dir, 1 << 20, undefined, () => {
      // When the spool says "send", the file is already there and holds exactly the bytes to send.
      for (const e of s!.unsent(1)) {
        expect(readFileSync(join(dir, `${e.id}.pb`))).toEqual(e.bytes);
        ready.push(e.id);
      }
    });
    s.add(detection('d-1'));
    expect(unsentIds(s)).toEqual([]); // the write is in flight: not sendable yet
    await s.settled();
    expect(ready).toEqual(['d-1']);
    expect(onDisk(dir, 'd-1')?.ruleId).toBe('cr0-wp-clear');
    expect(unsentIds(s)).toEqual(['d-1']);
  });

  it('a detection being completed is written at once, held back, then rewritten complete and released', async () => {
    const dir = spoolDir();
    let released = 0;
    const s = new DetectionSpool(dir, 1 << 20, undefined, () => released++);
    const d = detection('d-2');
    const e = s.add(d, { ready: false })!;
    await s.settled();
    expect(onDisk(dir, 'd-2')?.instructionText).toBe(''); // on disk: a kill -9 now would not lose it
    expect(unsentIds(s)).toEqual([]);
    expect(released).toBe(0);
    d.instructionText = 'mov cr0,rax';
    s.update(e, d);
    expect(unsentIds(s)).toEqual([]); // the complete version is not on disk yet
    await s.settled();
    expect(released).toBe(1);
    expect(onDisk(dir, 'd-2')?.instructionText).toBe('mov cr0,rax');
    expect(Detection.decode([...s.unsent(1)][0]!.bytes).instructionText).toBe('mov cr0,rax');
    expect(s.bytes).toBe(readFileSync(join(dir, 'd-2.pb')).length);
  });

  it('an acknowledgement racing the write leaves no file behind', async () => {
    const dir = spoolDir();
    const s = new DetectionSpool(dir, 1 << 20);
    s.add(detection('d-3'));
    s.ack(['d-3']);
    await s.settled();
    await new Promise((r) => setTimeout(r, 50)); // the ack's own unlink
    expect(readdirSync(dir)).toEqual([]);
    expect(s.count).toBe(0);
    expect(s.bytes).toBe(0);
  });

  it('a restart loads the spooled detections (also one never completed) and removes interrupted writes', async () => {
    const dir = spoolDir();
    const s = new DetectionSpool(dir, 1 << 20);
    s.add(detection('d-4'));
    s.add(detection('d-5'), { ready: false });
    await s.settled();
    writeFileSync(join(dir, 'd-6.pb.1.tmp'), 'half a write');
    const again = new DetectionSpool(dir, 1 << 20);
    expect(unsentIds(again).sort()).toEqual(['d-4', 'd-5']);
    expect(again.stats.loaded).toBe(2);
    expect(readdirSync(dir).sort()).toEqual(['d-4.pb', 'd-5.pb']);
  });

  it('without a directory entries are sendable at once; a full spool drops and counts', () => {
    let released = 0;
    const s = new DetectionSpool(undefined, 200, undefined, () => released++);
    expect(s.add(detection('m-1'))).toBeDefined();
    expect(released).toBe(1);
    expect(unsentIds(s)).toEqual(['m-1']);
    const big = detection('m-2');
    big.summary = 'x'.repeat(300);
    expect(s.add(big)).toBeUndefined();
    expect(s.stats.dropped).toBe(1);
    expect(unsentIds(s)).toEqual(['m-1']);
  });
});
