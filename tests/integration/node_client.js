// node_client.js: an HTTP client of ours for the node test (tests/integration/node.sh) that
// checks every byte it gets back.
//
//   node node_client.js --port P --site DIR [--gets N] [--posts M] [--concurrency C]
//                       [--keep-alive yes|no]
//
// C requests in flight at a time through one http.Agent (keep-alive or a connection per
// request). N GETs go round the files of DIR, and each body must equal its file. M POSTs to
// /echo send random bodies of 0 B to 2 MB, and each answer must be the same bytes with the
// right `x-sha256`. Prints `gets N posts M ok K failed F bytes B connections S` and exits 0 only
// when nothing failed.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');

const options = {port: 0, site: '', gets: 100, posts: 20, concurrency: 4, keepAlive: 'yes'};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(name in options)) {
        console.error(`unknown option ${argv[i]}`);
        process.exit(2);
    }
    options[name] = typeof options[name] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
}
const files = fs.readdirSync(options.site).sort().map((name) => ({
    name,
    data: fs.readFileSync(path.join(options.site, name)),
}));
const postSizes = [0, 1, 1000, 65535, 65536, 65537, 300000, 2 << 20];

const agent = new http.Agent({keepAlive: options.keepAlive === 'yes',
                              maxSockets: options.concurrency});
const sockets = new WeakSet();
let connections = 0;
let ok = 0;
let failed = 0;
let bytes = 0;

function request(method, url, body) {
    const headers = body ? {'content-length': body.length} : {};
    if (options.keepAlive !== 'yes') headers.connection = 'close';
    return new Promise((resolve, reject) => {
        const req = http.request({host: '127.0.0.1', port: options.port, method, path: url, agent,
                                  headers},
            (res) => {
                const chunks = [];
                res.on('data', (chunk) => chunks.push(chunk));
                res.on('end', () => resolve({res, body: Buffer.concat(chunks)}));
                res.on('error', reject);
            });
        req.on('socket', (socket) => {
            if (!sockets.has(socket)) {
                sockets.add(socket);
                connections++;
            }
        });
        req.setTimeout(30000, () => req.destroy(new Error('timed out after 30 s')));
        req.on('error', reject);
        req.end(body);
    });
}

function check(what, condition, detail) {
    if (condition) return true;
    failed++;
    console.error(`FAIL: ${what}: ${detail}`);
    return false;
}

async function one(index) {
    if (index < options.gets) {
        const file = files[index % files.length];
        const {res, body} = await request('GET', '/' + file.name);
        if (check(`GET /${file.name}`, res.statusCode === 200, `status ${res.statusCode}`) &&
            check(`GET /${file.name}`, body.equals(file.data),
                  `${body.length} bytes, expected ${file.data.length}, or different bytes`)) {
            ok++;
            bytes += body.length;
        }
        return;
    }
    const size = postSizes[(index - options.gets) % postSizes.length];
    const sent = crypto.randomBytes(size);
    const {res, body} = await request('POST', '/echo', sent);
    const hash = crypto.createHash('sha256').update(sent).digest('hex');
    if (check(`POST /echo of ${size} bytes`, res.statusCode === 200, `status ${res.statusCode}`) &&
        check(`POST /echo of ${size} bytes`, res.headers['x-sha256'] === hash,
              'the server received different bytes') &&
        check(`POST /echo of ${size} bytes`, body.equals(sent),
              `${body.length} bytes came back, or different bytes`)) {
        ok++;
        bytes += body.length + size;
    }
}

async function main() {
    const total = options.gets + options.posts;
    let next = 0;
    const start = process.hrtime.bigint();
    async function lane() {
        while (next < total) {
            const index = next++;
            try {
                await one(index);
            } catch (error) {
                check(`request ${index}`, false, error.message);
            }
        }
    }
    await Promise.all(Array.from({length: options.concurrency}, lane));
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    agent.destroy();
    console.log(`gets ${options.gets} posts ${options.posts} ok ${ok} failed ${failed} ` +
                `bytes ${bytes} connections ${connections} seconds ${seconds.toFixed(2)}`);
    process.exitCode = failed === 0 && ok === total ? 0 : 1;
}
main();
