// node_server.js: a small HTTP server of ours for the node test (tests/integration/node.sh).
//
//   node node_server.js PORT_FILE SITE_DIR [WORKERS]
//
// Listens on 127.0.0.1, an ephemeral port, and writes the port to PORT_FILE once listening.
// With WORKERS, a cluster: the primary forks that many workers and, as Node's cluster does by
// default on Linux (round-robin), accepts each connection itself and passes it to a worker
// over the IPC channel (SCM_RIGHTS) before anything reads it; the workers serve.
//   GET /NAME         the file SITE_DIR/NAME: files under 1 MB from memory (res.end of a
//                     Buffer), larger ones streamed from disk (fs.createReadStream piped into
//                     the response), with Content-Length either way
//   POST /echo        the request body back, with `x-sha256` the hex SHA-256 of what arrived
//   GET /stats        {"requests": N, "connections": N} as JSON
// SIGTERM closes the listener and every connection, then exits 0.
'use strict';
const cluster = require('cluster');
const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');

const [portFile, site, workers] = process.argv.slice(2);
if (!portFile || !site) {
    console.error('usage: node node_server.js PORT_FILE SITE_DIR [WORKERS]');
    process.exit(2);
}
if (workers && cluster.isPrimary) {
    cluster.schedulingPolicy = cluster.SCHED_RR;
    for (let k = 0; k < Number(workers); k++) cluster.fork();
    cluster.on('exit', (worker, code, signal) => {
        if (!worker.exitedAfterDisconnect) {
            console.error(`worker ${worker.process.pid} died (${code}, ${signal})`);
            process.exit(1);
        }
    });
    process.on('SIGTERM', () => cluster.disconnect(() => process.exit(0)));
    return;
}
const inMemory = new Map();
for (const name of fs.readdirSync(site)) {
    const file = path.join(site, name);
    if (fs.statSync(file).size < (1 << 20)) inMemory.set(name, fs.readFileSync(file));
}

let requests = 0;
let connections = 0;
const server = http.createServer((req, res) => {
    requests++;
    if (req.method === 'POST' && req.url === '/echo') {
        const chunks = [];
        req.on('data', (chunk) => chunks.push(chunk));
        req.on('end', () => {
            const body = Buffer.concat(chunks);
            res.writeHead(200, {
                'content-type': 'application/octet-stream',
                'content-length': body.length,
                'x-sha256': crypto.createHash('sha256').update(body).digest('hex'),
            });
            res.end(body);
        });
        return;
    }
    if (req.method === 'GET' && req.url === '/stats') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({requests, connections}));
        return;
    }
    const name = decodeURIComponent(req.url.slice(1));
    if (req.method !== 'GET' || name.includes('/') || name.startsWith('.')) {
        res.writeHead(404).end();
        return;
    }
    const cached = inMemory.get(name);
    if (cached) {
        res.writeHead(200, {'content-type': 'application/octet-stream',
                            'content-length': cached.length});
        res.end(cached);
        return;
    }
    const file = path.join(site, name);
    fs.stat(file, (error, stat) => {
        if (error || !stat.isFile()) {
            res.writeHead(404).end();
            return;
        }
        res.writeHead(200, {'content-type': 'application/octet-stream',
                            'content-length': stat.size});
        fs.createReadStream(file).pipe(res);
    });
});
server.keepAliveTimeout = 30000;
server.on('connection', () => connections++);
server.listen(0, '127.0.0.1', () => {
    fs.writeFileSync(portFile + '.tmp', String(server.address().port));
    fs.renameSync(portFile + '.tmp', portFile);
});
process.on('SIGTERM', () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
});
// A cluster worker: the primary's disconnect() ends it once its connections are closed.
if (cluster.isWorker) cluster.worker.on('disconnect', () => server.closeAllConnections());
