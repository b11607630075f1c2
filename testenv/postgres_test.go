package testenv

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestPostgresStartsWithScramAndIsRemoved(t *testing.T) {
	Integration(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg, err := StartPostgres(ctx)
	Check(t, err)
	if err := pg.Exec(ctx, "postgres", "select 1"); err != nil {
		t.Fatal(err)
	}
	// A wrong password must be refused: scram-sha-256 is really on.
	if c, err := pgconn.Connect(ctx, "postgres://postgres:wrong@"+pg.Addr()+"/postgres?sslmode=disable"); err == nil {
		c.Close(ctx)
		t.Fatal("login with a wrong password succeeded; pg_hba is not scram-sha-256")
	}
	pg.Close()
	if _, err := os.Stat(pg.Dir); !os.IsNotExist(err) {
		t.Fatalf("cluster directory %s left behind (err=%v)", pg.Dir, err)
	}
}
