import { defineConfig } from 'vite';

// The dashboard is plain TypeScript + DOM: Vite only bundles and hashes it. Output: apps/dashboard/dist,
// served by analysis at `/` (libs/analysis/src/static.ts).
export default defineConfig({
  root: import.meta.dirname,
  base: '/',
  build: { outDir: 'dist', emptyOutDir: true, target: 'es2022', sourcemap: true, reportCompressedSize: false },
  server: { proxy: { '/v1': 'http://127.0.0.1:7401', '/metrics': 'http://127.0.0.1:7401', '/healthz': 'http://127.0.0.1:7401' } },
});
