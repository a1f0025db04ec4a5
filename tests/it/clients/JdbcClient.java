// The PostgreSQL JDBC driver (what DBeaver and most Java BI tools use) against `kbcrm serve`:
// DatabaseMetaData.getTables / getColumns and a prepared query with a parameter.
// Run by tests/it/serve.rs: java -cp postgresql.jar JdbcClient.java PORT USER PASSWORD
import java.sql.*;
import java.util.*;

public class JdbcClient {
    static void check(boolean ok, String what) {
        if (!ok) {
            System.err.println("FAILED: " + what);
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/kbcrm";
        try (Connection c = DriverManager.getConnection(url, args[1], args[2])) {
            DatabaseMetaData md = c.getMetaData();
            check(md.getDatabaseProductName().equals("PostgreSQL"), "product " + md.getDatabaseProductName());
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            Collections.sort(tables);
            check(tables.equals(List.of(args[3].split(","))), "getTables " + tables);
            Map<String, String> cols = new LinkedHashMap<>();
            try (ResultSet rs = md.getColumns(null, "public", "sales", "%")) {
                while (rs.next()) cols.put(rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME"));
            }
            check(cols.keySet().equals(new LinkedHashSet<>(List.of("order_id", "customer_id", "order_date", "amount", "paid"))),
                  "getColumns " + cols);
            check(cols.get("order_date").equals("date") && cols.get("paid").equals("bool")
                  && cols.get("amount").equals("float8"), "column types " + cols);
            try (PreparedStatement ps = c.prepareStatement(
                    "select customer_id, amount, order_date from sales where order_id = ?")) {
                ps.setString(1, "O3");
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "a row for O3");
                    check(rs.getString(1).equals("C2") && rs.getDouble(2) == 10.0
                          && rs.getDate(3).toString().equals("2025-01-09"), "row of O3");
                }
            }
        }
        System.out.println("all jdbc checks passed");
    }
}
