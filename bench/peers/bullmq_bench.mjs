// BullMQ on the same Redis as TenantTune's mirror: submit, pickup and status-read latencies.
//
// Usage: node bullmq_bench.mjs [redisUrl] [jobs]
// First prints one JSON line: {version, submit_ms: [...], pickup_ms: [...]}. Then it reads
// commands on stdin, one a line, so the caller can interleave its own measurements:
//   status <clients> <seconds>  → {clients, latencies_ms: [...], elapsed_s}
//   quit                        → obliterates its queue and exits
// It uses a queue of its own name, so nothing else in the database is touched.
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import { Queue, QueueEvents, Worker } from "bullmq";
import IORedis from "ioredis";

const require = createRequire(import.meta.url);
const version = require("bullmq/package.json").version;

const [redisUrl = "redis://127.0.0.1:6379/11", jobsArg = "30"] = process.argv.slice(2);
const jobs = Number(jobsArg);
const url = new URL(redisUrl);
// BullMQ 6 takes ioredis as an optional peer; in ESM it wants ready-made clients.
const connect = () =>
  new IORedis({
    host: url.hostname,
    port: Number(url.port || 6379),
    db: Number(url.pathname.slice(1) || 0),
    maxRetriesPerRequest: null,
  });
const name = `tt-bench-${process.pid}`;
const data = { companyId: "acme", hyperparameters: { epochs: 1, batchSize: 8, learningRate: 0.002 } };

const queue = new Queue(name, { connection: connect() });
await queue.waitUntilReady();

// Submit: Queue.add, one after another (what POST /train does for the old service).
const submit = [];
for (let i = 0; i < jobs; i++) {
  const t0 = performance.now();
  await queue.add("train", data);
  submit.push(performance.now() - t0);
}
await queue.drain(true);

// Pickup: add a job to an idle worker and time until its processor runs, one job at a time.
let started = null;
const worker = new Worker(
  name,
  async () => {
    started?.(performance.now());
    return { model_path: "/models/acme/x" };
  },
  { connection: connect(), concurrency: 1 },
);
await worker.waitUntilReady();
const pickup = [];
const ids = [];
for (let i = 0; i < jobs + 1; i++) {
  const running = new Promise((resolve) => {
    started = resolve;
  });
  const t0 = performance.now();
  const job = await queue.add("train", data);
  const t1 = await running;
  if (i > 0) pickup.push(t1 - t0); // the first one warms the worker's connection
  ids.push(job.id);
}
// Let the last job finish, then stop the worker.
const events = new QueueEvents(name, { connection: connect() });
await events.waitUntilReady();
while ((await queue.getJobState(ids[ids.length - 1])) !== "completed") {
  await new Promise((r) => setTimeout(r, 10));
}
await worker.close();
await events.close();

// Status: Bull's read, getJob + getState of a completed job, closed loop of N clients.
const target = ids[ids.length - 1];
async function read() {
  const t0 = performance.now();
  const job = await queue.getJob(target);
  const state = await job.getState();
  if (state !== "completed") throw new Error(`unexpected state ${state}`);
  return performance.now() - t0;
}
process.stdout.write(JSON.stringify({ version, submit_ms: submit, pickup_ms: pickup }) + "\n");

async function statusCell(clients, seconds) {
  await Promise.all(Array.from({ length: clients }, read)); // warm-up
  const deadline = performance.now() + seconds * 1000;
  const latencies = [];
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (performance.now() < deadline) latencies.push(await read());
    }),
  );
  return { clients, latencies_ms: latencies, elapsed_s: (performance.now() - t0) / 1000 };
}

for await (const line of createInterface({ input: process.stdin })) {
  const [cmd, ...args] = line.trim().split(/\s+/);
  if (cmd === "status") {
    const cell = await statusCell(Number(args[0]), Number(args[1]));
    process.stdout.write(JSON.stringify(cell) + "\n");
  } else if (cmd === "quit") {
    break;
  }
}
await queue.obliterate({ force: true });
await queue.close();
process.exit(0); // the ioredis clients handed to BullMQ stay open otherwise
