// A client of the `orders` table of tests/drivers.rs, through pgx (v4, Debian's
// golang-github-jackc-pgx-v4-dev, built in GOPATH mode):
//
//	client HOST PORT DATABASE USER FIRST_ID block|single
//
// Reads and writes through pgx's statement cache (its default mode: each statement prepared
// and described on its first use, then run by Bind and Execute alone, its results read in
// binary with the description it was given then) until its standard input closes, each
// round one transaction (`block`) or statements on their own (`single`). Prints `ready`,
// `round` after each round, `error <text>` for every error or wrong value, then `done`.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v4"
)

const rows = 200

var out sync.Mutex

func say(line string) {
	out.Lock()
	defer out.Unlock()
	fmt.Println(strings.ReplaceAll(line, "\n", " "))
}

// The session's way to run a statement: the connection, or its transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...interface{}) (pgx.Rows, error)
}

// One row as values, or nil when there is none.
func one(ctx context.Context, q querier, sql string, args ...interface{}) ([]interface{}, error) {
	r, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var row []interface{}
	if r.Next() {
		row, err = r.Values()
		if err != nil {
			return nil, err
		}
	}
	for r.Next() {
	}
	return row, r.Err()
}

// A column's value as an integer, whichever integer type it was read as.
func integer(v interface{}) (int64, bool) {
	switch n := v.(type) {
	case int16:
		return int64(n), true
	case int32:
		return int64(n), true
	case int64:
		return n, true
	}
	return 0, false
}

func is(v interface{}, want int64) bool {
	n, ok := integer(v)
	return ok && n == want
}

// One round's statements; false when one of them failed or read a wrong value.
func round(ctx context.Context, q querier, id, fresh int32) bool {
	ok := true
	fail := func(line string) {
		say("error " + line)
		ok = false
	}
	if row, err := one(ctx, q, "SELECT * FROM orders WHERE id = $1", id); err != nil {
		fail("SELECT *: " + err.Error())
	} else if len(row) < 3 || !is(row[0], int64(id)) || !is(row[1], int64(id)*10) || row[2] != fmt.Sprintf("n%d", id) {
		fail(fmt.Sprintf("SELECT * read %v for id %d", row, id))
	}
	if row, err := one(ctx, q, "SELECT amount, note FROM orders WHERE id = $1", id); err != nil {
		fail("SELECT amount: " + err.Error())
	} else if len(row) != 2 || !is(row[0], int64(id)*10) {
		fail(fmt.Sprintf("SELECT amount read %v for id %d", row, id))
	}
	insert := "INSERT INTO orders (id, amount, note) VALUES ($1, $2, $3) RETURNING *"
	if row, err := one(ctx, q, insert, fresh, fresh*2, "ins"); err != nil {
		fail("INSERT: " + err.Error())
	} else if len(row) < 2 || !is(row[0], int64(fresh)) || !is(row[1], int64(fresh)*2) {
		fail(fmt.Sprintf("INSERT RETURNING gave %v for %d", row, fresh))
	}
	if _, err := one(ctx, q, "UPDATE orders SET note = $1 WHERE amount = $2", "upd", fresh*2); err != nil {
		fail("UPDATE: " + err.Error())
	}
	return ok
}

func main() {
	host, port, db, user := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	first, _ := strconv.Atoi(os.Args[5])
	block := os.Args[6] == "block"
	var stop atomic.Bool
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop.Store(true)
	}()
	defer say("done")
	ctx := context.Background()
	url := fmt.Sprintf("postgres://%s@%s:%s/%s?sslmode=disable", user, host, port, db)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		say("error connection: " + err.Error())
		return
	}
	defer conn.Close(ctx)
	say("ready")
	for n := int32(first); !stop.Load(); n++ {
		id, fresh := 1+n%rows, 1_000_000+n
		if !block {
			round(ctx, conn, id, fresh)
		} else if tx, err := conn.Begin(ctx); err != nil {
			say("error BEGIN: " + err.Error())
		} else if round(ctx, tx, id, fresh) {
			if err := tx.Commit(ctx); err != nil {
				say("error COMMIT: " + err.Error())
			}
		} else if err := tx.Rollback(ctx); err != nil {
			say("error ROLLBACK: " + err.Error())
		}
		say("round")
	}
}
