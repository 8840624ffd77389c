// A client of the `orders` table of tests/drivers.rs, through node-postgres (`pg` from npm):
//
//     node client.js HOST PORT DATABASE USER FIRST_ID block|single
//
// Reads and writes with named prepared statements (`{ name, text, values }`: parsed once
// per connection, then Bind, Describe of the portal and Execute on every run, results in
// text) until its standard input closes, each round one transaction (`block`) or
// statements on their own (`single`). Prints `ready`, `round` after each round,
// `error <text>` for every error or wrong value, then `done`. node-postgres reads a bigint
// as a string, so values are compared as numbers.

'use strict';

const { Client } = require('pg');

const ROWS = 200;
let stop = false;
process.stdin.on('data', () => {});
process.stdin.on('end', () => {
  stop = true;
});
process.stdin.resume();

function say(line) {
  process.stdout.write(line.replace(/\n/g, ' ') + '\n');
}

const STATEMENTS = {
  all: 'SELECT * FROM orders WHERE id = $1',
  col: 'SELECT amount, note FROM orders WHERE id = $1',
  ins: 'INSERT INTO orders (id, amount, note) VALUES ($1, $2, $3) RETURNING *',
  upd: 'UPDATE orders SET note = $1 WHERE amount = $2',
};

async function run(c, name, values) {
  const r = await c.query({ name, text: STATEMENTS[name], values });
  return r.rows[0];
}

async function round(c, id, fresh) {
  let ok = true;
  const fail = (line) => {
    say('error ' + line);
    ok = false;
  };
  const steps = [
    ['SELECT *', 'all', [id], (row) => row && Number(row.id) === id && Number(row.amount) === id * 10 && row.note === 'n' + id],
    ['SELECT amount', 'col', [id], (row) => row && Number(row.amount) === id * 10],
    ['INSERT', 'ins', [fresh, fresh * 2, 'ins'], (row) => row && Number(row.id) === fresh && Number(row.amount) === fresh * 2],
    ['UPDATE', 'upd', ['upd', fresh * 2], null],
  ];
  for (const [what, name, values, check] of steps) {
    try {
      const row = await run(c, name, values);
      if (check && !check(row)) {
        fail(`${what} read ${JSON.stringify(row)} for ${values[0]}`);
      }
    } catch (e) {
      fail(`${what}: ${e.code || ''} ${e.message}`);
    }
  }
  return ok;
}

async function main() {
  const [host, port, database, user, firstArg, mode] = process.argv.slice(2);
  const block = mode === 'block';
  const c = new Client({ host, port: Number(port), database, user });
  await c.connect();
  say('ready');
  for (let n = Number(firstArg); !stop; n++) {
    const id = 1 + (n % ROWS);
    const fresh = 1000000 + n;
    if (!block) {
      await round(c, id, fresh);
    } else {
      try {
        await c.query('BEGIN');
        const ok = await round(c, id, fresh);
        await c.query(ok ? 'COMMIT' : 'ROLLBACK');
      } catch (e) {
        say(`error transaction: ${e.code || ''} ${e.message}`);
      }
    }
    say('round');
  }
  await c.end();
}

main()
  .catch((e) => say(`error connection: ${e.message}`))
  .finally(() => {
    say('done');
    process.exit(0);
  });
