package proxy

import "testing"

func TestScanSQL(t *testing.T) {
	for _, c := range []struct {
		sql     string
		want    sqlFlags
		dealloc string
	}{
		{"SELECT abalance FROM pgbench_accounts WHERE aid = $1", 0, ""},
		{"UPDATE t SET owner = current_setting('pgwarden.subject')", 0, ""},
		{"select current_setting('pgwarden.subject')", 0, ""},
		{"SET pgwarden.subject = 'mallory'", sqlSession | sqlForge, ""},
		{"set  local  PGWARDEN.groups to '{admins}'", sqlForge, ""},
		{`SET "pgwarden.subject" = 'x'`, sqlSession | sqlForge, ""},
		{"SET SESSION pgwarden . level = 'admin'", sqlSession | sqlForge, ""},
		{"RESET pgwarden.subject", sqlSession | sqlForge, ""},
		{"select set_config('pgwarden.subject', 'x', false)", sqlSession | sqlForge, ""},
		{"select set_config( E'PGWARDEN.subject', 'x', true)", sqlSession | sqlForge, ""},
		{"DO $$BEGIN PERFORM set_config('pgwarden.subject', 'x', false); END$$", sqlSession | sqlForge, ""},
		{"ALTER ROLE CURRENT_USER SET pgwarden.subject = 'x'", sqlForge, ""},
		{"-- SET pgwarden.subject = 'x'\nSELECT 1", 0, ""},
		{"/* SET /* nested */ pgwarden.subject */ SELECT 'SET pgwarden.subject'", 0, ""},
		{"SET search_path = evil", sqlSession, ""},
		{"SET application_name = 'x'", sqlTracked, ""},
		{"SET TIME ZONE 'UTC'", sqlTracked, ""},
		{"SET LOCAL search_path = x", 0, ""},
		{"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", 0, ""},
		{"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", sqlSession, ""},
		{"LISTEN chan", sqlSession | sqlListen, ""},
		{"select 1; listen chan", sqlSession | sqlListen, ""},
		{"DISCARD ALL", sqlSession | sqlDiscardAll | sqlResetAll, ""},
		{"RESET ALL", sqlSession | sqlResetAll, ""},
		{"DEALLOCATE ALL", sqlSession | sqlDeallocate, ""},
		{"deallocate prepare S_1", sqlSession | sqlDeallocate, "s_1"},
		{`DEALLOCATE "S_1"`, sqlSession | sqlDeallocate, "S_1"},
		{"DEALLOCATE x; SELECT 1", sqlSession, ""},
		{"CREATE TEMP TABLE t (a int)", sqlSession, ""},
		{"create global temporary table t (a int)", sqlSession, ""},
		{"DECLARE c CURSOR WITH HOLD FOR SELECT 1", sqlSession, ""},
		{"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", 0, ""},
		{"SELECT pg_advisory_lock(1)", sqlSession, ""},
		{"SELECT pg_advisory_xact_lock(1)", 0, ""},
		{"PREPARE TRANSACTION 'x'", 0, ""},
		{"PREPARE p AS SELECT 1", sqlSession, ""},
		{"SELECT $1::text, $tag$ SET pgwarden.x $tag$", sqlSession | sqlForge, ""},
		{"SELECT 'unterminated", 0, ""},
		// Ways to name a setting that a lexer cannot read: refused.
		{"SELECT set_config($1, $2, false)", sqlSession | sqlForge, ""},
		{"SELECT set_config(E'\\x70gwarden.subject', 'x', false)", sqlSession | sqlForge, ""},
		{"SELECT set_config(U&'\\0070gwarden.subject', 'x', false)", sqlSession | sqlForge, ""},
		{"SELECT set_config(('pgwarden.subject'), 'x', false)", sqlSession | sqlForge, ""},
		{"SELECT \"set_config\"('pgwarden.subject', 'x', false)", sqlForge, ""},
		{"SELECT set_config(setting_name => 'pgwarden.subject', new_value => 'x', is_local => false)", sqlSession | sqlForge, ""},
		{"SELECT set_config('pgwar' || 'den.subject', 'x', false)", sqlSession | sqlForge, ""},
		{"SELECT set_config('app.tenant', $1, false)", sqlSession, ""},
		{`SET U&"pgwarden.subject" = 'x'`, sqlSession | sqlForge, ""},
		{"SET pgwarden/**/.subject = 'x'", sqlSession | sqlForge, ""},
		{"SET standard_conforming_strings = off", sqlSession | sqlForge, ""},
		{"SET standard_conforming_strings TO on", sqlSession, ""},
		{"UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'", sqlForge, ""},
		{"EXPLAIN ANALYZE UPDATE pg_settings SET setting = 'bob' WHERE name = 'pgwarden.subject'", sqlForge, ""},
		{"PREPARE p AS UPDATE pg_settings SET setting = 'bob' WHERE name = 'pgwarden.subject'", sqlSession | sqlForge, ""},
		{"SELECT name FROM pg_settings", 0, ""},
		{"DO $$BEGIN EXECUTE 'SET pgwar' || 'den.subject = 1'; END$$", sqlSession | sqlForge, ""},
		{"DO $$BEGIN PERFORM 1; END$$", sqlSession, ""},
		{"SELECT * INTO TEMP t FROM items", sqlSession, ""},
		{"CREATE TABLE pg_temp.accounts (a int)", sqlSession, ""},
		{`DECLARE "c" NO SCROLL CURSOR WITH HOLD FOR SELECT 1`, sqlSession, ""},
	} {
		got, dealloc := scanSQL([]byte(c.sql))
		if got != c.want || dealloc != c.dealloc {
			t.Errorf("scanSQL(%q) = %b, %q; want %b, %q", c.sql, got, dealloc, c.want, c.dealloc)
		}
	}
}

func TestScanSQLDoesNotAllocate(t *testing.T) {
	q := []byte("SELECT abalance FROM pgbench_accounts WHERE aid = 12345; UPDATE t SET x = current_setting('pgwarden.subject')")
	if n := testing.AllocsPerRun(100, func() { scanSQL(q) }); n != 0 {
		t.Fatalf("scanSQL allocates %.0f times per call", n)
	}
}

func FuzzScanSQL(f *testing.F) {
	for _, s := range []string{"SET pgwarden.subject = 'x'", "DO $a$ $b$ x $b$ $a$", "E'\\'", "/* /* */", `"a""b"`, "DEALLOCATE \"x\""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		scanSQL([]byte(s)) // must not panic or loop
	})
}
