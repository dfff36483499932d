/** A small Prometheus text-format registry (counters and gauges with labels). */
type Labels = Readonly<Record<string, string>>;

const key = (l: Labels): string => Object.keys(l).sort().map((k) => `${k}="${String(l[k]).replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`).join(',');

export class Metric {
  private readonly values = new Map<string, number>();
  private readonly fns: (() => number)[] = [];
  constructor(readonly name: string, readonly help: string, readonly type: 'counter' | 'gauge') {}
  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    this.values.set(k, (this.values.get(k) ?? 0) + by);
  }
  set(labels: Labels, v: number): void {
    this.values.set(key(labels), v);
  }
  track(fn: () => number): this {
    this.fns.push(fn);
    return this;
  }
  get(labels: Labels = {}): number {
    return this.values.get(key(labels)) ?? 0;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} ${this.type}`];
    for (const fn of this.fns) lines.push(`${this.name} ${fn()}`);
    for (const [k, v] of this.values) lines.push(`${this.name}${k ? `{${k}}` : ''} ${v}`);
    return lines.join('\n');
  }
}

export class Registry {
  private readonly metrics: Metric[] = [];
  counter(name: string, help: string): Metric {
    const m = new Metric(name, help, 'counter');
    this.metrics.push(m);
    return m;
  }
  gauge(name: string, help: string): Metric {
    const m = new Metric(name, help, 'gauge');
    this.metrics.push(m);
    return m;
  }
  render(): string {
    return `${this.metrics.map((m) => m.render()).join('\n')}\n`;
  }
}
