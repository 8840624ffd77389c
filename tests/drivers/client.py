#!/usr/bin/env python3
"""A client of the `orders` table of tests/drivers.rs, through one Python driver.

    client.py asyncpg|psycopg HOST PORT DATABASE USER FIRST_ID block|single

Reads and writes with the driver's own prepared statements (asyncpg's statement cache;
psycopg's server-side statements from the first execution) until its standard input closes,
each round one transaction block (`block`) or statements on their own (`single`). Prints
`ready` once its statements are prepared, `round` after each round and `error <text>` for
every error or wrong value, then `done`.
"""

import asyncio
import sys
import threading

ROWS = 200
stop = threading.Event()


def watch_stdin():
    sys.stdin.read()
    stop.set()


def say(line):
    print(line.replace("\n", " "), flush=True)


SELECT_ALL = "SELECT * FROM orders WHERE id = $1"
SELECT_COL = "SELECT amount, note FROM orders WHERE id = $1"
INSERT = "INSERT INTO orders (id, amount, note) VALUES ($1, $2, $3) RETURNING *"
UPDATE = "UPDATE orders SET note = $1 WHERE amount = $2"


def check_all(row, id):
    """`row` by column name: as the client was told, or as the table is now when the
    driver learns the new shape by itself (psycopg describes every execution)."""
    if row is None or (row.get("id"), row.get("amount"), row.get("note")) != (id, id * 10, f"n{id}"):
        return f"SELECT * read {row!r} for id {id}"
    if row.get("extra") not in (None, id) or row.get("added", 5) != 5:
        return f"SELECT * read {row!r} for id {id}"
    return None


def check_col(row, id):
    if row is None or row.get("amount") != id * 10:
        return f"SELECT amount read {row!r} for id {id}"
    return None


def check_insert(row, new_id):
    if row is None or (row.get("id"), row.get("amount")) != (new_id, new_id * 2):
        return f"INSERT RETURNING gave {row!r} for {new_id}"
    return None


async def rounds(run, begin, end, first):
    """Runs rounds until stopped; `run(sql, args, fetch)` runs one statement."""
    n = first
    steps = [
        ("SELECT *", SELECT_ALL, lambda id, new: (id,), check_all),
        ("SELECT amount", SELECT_COL, lambda id, new: (id,), check_col),
        ("INSERT", INSERT, lambda id, new: (new, new * 2, "ins"), lambda row, id: check_insert(row, 1_000_000 + n)),
        ("UPDATE", UPDATE, lambda id, new: ("upd", new * 2), None),
    ]
    while not stop.is_set():
        id, new = 1 + n % ROWS, 1_000_000 + n
        failed = False
        if begin:
            try:
                await begin()
            except Exception as e:  # noqa: BLE001 - every error is the test's finding
                say(f"error BEGIN: {type(e).__name__}: {e}")
                failed = True
        for name, sql, args, check in steps:
            try:
                row = await run(sql, args(id, new), check is not None)
                wrong = check(row, id) if check else None
                if wrong:
                    say(f"error {wrong}")
                    failed = True
            except Exception as e:  # noqa: BLE001
                say(f"error {name}: {type(e).__name__}: {e}")
                failed = True
        if end:
            try:
                await end(failed)
            except Exception as e:  # noqa: BLE001
                say(f"error END: {type(e).__name__}: {e}")
        n += 1
        say("round")


async def with_asyncpg(host, port, db, user, first, block):
    import asyncpg

    c = await asyncpg.connect(host=host, port=port, database=db, user=user)
    for sql in (SELECT_ALL, SELECT_COL, INSERT, UPDATE):
        await c.prepare(sql)  # into the connection's statement cache
    say("ready")
    tx = {}

    async def run(sql, args, fetch):
        if fetch:
            row = await c.fetchrow(sql, *args)
            return None if row is None else dict(row.items())
        await c.execute(sql, *args)
        return None

    async def begin():
        tx["t"] = c.transaction()
        await tx["t"].start()

    async def end(failed):
        t = tx.pop("t", None)
        if t is not None:
            await (t.rollback() if failed else t.commit())

    await rounds(run, begin if block else None, end if block else None, first)
    await c.close()


async def with_psycopg(host, port, db, user, first, block):
    import psycopg

    c = await psycopg.AsyncConnection.connect(
        host=host, port=port, dbname=db, user=user, autocommit=True, prepare_threshold=0
    )

    def pyformat(sql):
        for i in range(3, 0, -1):
            sql = sql.replace(f"${i}", "%s")
        return sql

    async def run(sql, args, fetch):
        cur = await c.execute(pyformat(sql), args, prepare=True)
        if not fetch:
            return None
        row = await cur.fetchone()
        return None if row is None else {d.name: v for d, v in zip(cur.description, row)}

    say("ready")

    async def begin():
        await c.execute("BEGIN")

    async def end(failed):
        await c.execute("ROLLBACK" if failed else "COMMIT")

    await rounds(run, begin if block else None, end if block else None, first)
    await c.close()


def main():
    driver, host, port, db, user, first, mode = sys.argv[1:8]
    threading.Thread(target=watch_stdin, daemon=True).start()
    run = {"asyncpg": with_asyncpg, "psycopg": with_psycopg}[driver]
    try:
        asyncio.run(run(host, int(port), db, user, int(first), mode == "block"))
    except Exception as e:  # noqa: BLE001
        say(f"error connection: {type(e).__name__}: {e}")
    say("done")


if __name__ == "__main__":
    main()
