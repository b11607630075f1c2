// TxnJdbc drives pgwarden with pgjdbc and server-prepared statements
// (prepareThreshold=1): THREADS connections, each running QUERIES statements
// of a few shapes and checking every answer. It prints "ok" and exits 0, or
// prints the first failure and exits 1. Run by TestTxnPgjdbcServerPrepared.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.*;

public class TxnJdbc {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int threads = Integer.parseInt(args[1]);
        int queries = Integer.parseInt(args[2]);
        AtomicReference<String> failure = new AtomicReference<>();
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<?>> done = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int id = t;
            done.add(pool.submit(() -> {
                Properties p = new Properties();
                p.setProperty("password", "jdbc" + id);
                try (Connection c = DriverManager.getConnection(url, p)) {
                    PreparedStatement add = c.prepareStatement("SELECT ?::int + 1");
                    PreparedStatement cat = c.prepareStatement("SELECT ?::text || 'x'");
                    PreparedStatement cnt = c.prepareStatement("SELECT count(*)::int FROM items WHERE id > ?");
                    for (int i = 0; i < queries && failure.get() == null; i++) {
                        switch (i % 4) {
                            case 0: {
                                add.setInt(1, i);
                                try (ResultSet rs = add.executeQuery()) {
                                    rs.next();
                                    if (rs.getInt(1) != i + 1) failure.compareAndSet(null, "thread " + id + " query " + i + ": got " + rs.getInt(1));
                                }
                                break;
                            }
                            case 1: {
                                cat.setString(1, "v" + i);
                                try (ResultSet rs = cat.executeQuery()) {
                                    rs.next();
                                    if (!rs.getString(1).equals("v" + i + "x")) failure.compareAndSet(null, "thread " + id + " query " + i + ": got " + rs.getString(1));
                                }
                                break;
                            }
                            case 2: {
                                cnt.setInt(1, -i);
                                try (ResultSet rs = cnt.executeQuery()) {
                                    rs.next();
                                    if (rs.getInt(1) < 2) failure.compareAndSet(null, "thread " + id + " query " + i + ": count " + rs.getInt(1));
                                }
                                break;
                            }
                            default: {
                                c.setAutoCommit(false);
                                add.setInt(1, i);
                                try (ResultSet rs = add.executeQuery()) {
                                    rs.next();
                                    if (rs.getInt(1) != i + 1) failure.compareAndSet(null, "thread " + id + " tx query " + i + ": got " + rs.getInt(1));
                                }
                                c.commit();
                                c.setAutoCommit(true);
                            }
                        }
                    }
                } catch (Exception e) {
                    failure.compareAndSet(null, "thread " + id + ": " + e);
                }
            }));
        }
        for (Future<?> f : done) f.get();
        pool.shutdown();
        if (failure.get() != null) {
            System.out.println("FAIL " + failure.get());
            System.exit(1);
        }
        System.out.println("ok");
    }
}
