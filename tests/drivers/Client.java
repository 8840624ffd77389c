// A client of the `orders` table of tests/drivers.rs, through pgjdbc:
//
//     java -cp postgresql.jar Client.java HOST PORT DATABASE USER FIRST_ID block|single
//
// Reads and writes with server-side prepared statements (prepareThreshold=1: named from the
// first execution, binary results where pgjdbc asks for them) until its standard input
// closes, each round one transaction (`block`) or each statement committed on its own
// (`single`). Prints `ready`, `round` after each round, `error <text>` for every error or
// wrong value, then `done`.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;

public class Client {
    static final int ROWS = 200;
    static final AtomicBoolean stop = new AtomicBoolean(false);

    static synchronized void say(String line) {
        System.out.println(line.replace('\n', ' '));
        System.out.flush();
    }

    static String describe(SQLException e) {
        return e.getSQLState() + " " + e.getMessage();
    }

    public static void main(String[] args) throws Exception {
        String host = args[0], port = args[1], db = args[2], user = args[3];
        int first = Integer.parseInt(args[4]);
        boolean block = args[5].equals("block");
        Thread watch = new Thread(() -> {
            try {
                while (System.in.read() >= 0) {
                }
            } catch (java.io.IOException e) {
                // the pipe is gone: stop all the same
            }
            stop.set(true);
        });
        watch.setDaemon(true);
        watch.start();
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection("jdbc:postgresql://" + host + ":" + port + "/" + db, props)) {
            c.setAutoCommit(!block);
            PreparedStatement all = c.prepareStatement("SELECT * FROM orders WHERE id = ?");
            PreparedStatement col = c.prepareStatement("SELECT amount, note FROM orders WHERE id = ?");
            PreparedStatement ins = c.prepareStatement("INSERT INTO orders (id, amount, note) VALUES (?, ?, ?) RETURNING *");
            PreparedStatement upd = c.prepareStatement("UPDATE orders SET note = ? WHERE amount = ?");
            say("ready");
            int n = first;
            while (!stop.get()) {
                int id = 1 + n % ROWS, fresh = 1_000_000 + n;
                boolean failed = false;
                try {
                    all.setInt(1, id);
                    try (ResultSet r = all.executeQuery()) {
                        if (!r.next()) {
                            say("error SELECT * read no row for id " + id);
                            failed = true;
                        } else if (r.getInt(1) != id || r.getInt(2) != id * 10 || !("n" + id).equals(r.getString(3))) {
                            say("error SELECT * read (" + r.getString(1) + ", " + r.getString(2) + ", " + r.getString(3) + ") for id " + id);
                            failed = true;
                        }
                    }
                } catch (SQLException e) {
                    say("error SELECT *: " + describe(e));
                    failed = true;
                }
                try {
                    col.setInt(1, id);
                    try (ResultSet r = col.executeQuery()) {
                        if (!r.next() || r.getInt(1) != id * 10) {
                            say("error SELECT amount read a wrong value or none for id " + id);
                            failed = true;
                        }
                    }
                } catch (SQLException e) {
                    say("error SELECT amount: " + describe(e));
                    failed = true;
                }
                try {
                    ins.setInt(1, fresh);
                    ins.setInt(2, fresh * 2);
                    ins.setString(3, "ins");
                    try (ResultSet r = ins.executeQuery()) {
                        if (!r.next() || r.getInt(1) != fresh || r.getInt(2) != fresh * 2) {
                            say("error INSERT RETURNING gave a wrong row or none for " + fresh);
                            failed = true;
                        }
                    }
                } catch (SQLException e) {
                    say("error INSERT: " + describe(e));
                    failed = true;
                }
                try {
                    upd.setString(1, "upd");
                    upd.setInt(2, fresh * 2);
                    upd.executeUpdate();
                } catch (SQLException e) {
                    say("error UPDATE: " + describe(e));
                    failed = true;
                }
                if (block) {
                    try {
                        if (failed) {
                            c.rollback();
                        } else {
                            c.commit();
                        }
                    } catch (SQLException e) {
                        say("error END: " + describe(e));
                    }
                }
                n++;
                say("round");
            }
        } catch (SQLException e) {
            say("error connection: " + describe(e));
        }
        say("done");
    }
}
