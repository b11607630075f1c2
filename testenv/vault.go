package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Vault is a Vault dev server (in memory) on 127.0.0.1. Close stops it.
type Vault struct {
	Addr      string // http://127.0.0.1:port
	RootToken string

	cmd  *exec.Cmd
	done chan struct{}
	home string
	log  LockedBuffer
}

// VaultBinary finds a vault binary: $PGWARDEN_VAULT_BIN, then bin/vault in the
// repository (built by `make vault`), then vault on PATH.
func VaultBinary() (string, error) {
	if p := os.Getenv("PGWARDEN_VAULT_BIN"); p != "" {
		return p, nil
	}
	if root, err := RepoRoot(); err == nil {
		p := filepath.Join(root, "bin", "vault")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("vault"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%w: no vault binary: run `make vault` (builds bin/vault from testenv/vaultbin), put vault on PATH, or set PGWARDEN_VAULT_BIN", ErrMissing)
}

// RepoRoot walks up from the working directory to the directory holding
// pgwarden's go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module github.com/pgwarden/pgwarden\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("testenv: pgwarden repository root not found above the working directory")
		}
		dir = parent
	}
}

// StartVault starts `vault server -dev` and waits until it is unsealed.
func StartVault(ctx context.Context) (*Vault, error) {
	bin, err := VaultBinary()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	home, err := os.MkdirTemp("", "pgwarden-vault-")
	if err != nil {
		return nil, err
	}
	v := &Vault{Addr: fmt.Sprintf("http://127.0.0.1:%d", port), RootToken: "root-" + randomHex(12), home: home, done: make(chan struct{})}
	v.cmd = runAs{}.command(context.Background(), bin, "server", "-dev",
		"-dev-listen-address", fmt.Sprintf("127.0.0.1:%d", port),
		"-dev-root-token-id", v.RootToken, "-dev-no-store-token", "-log-level", "warn")
	v.cmd.Env = append(os.Environ(), "HOME="+home, "VAULT_DISABLE_MLOCK=true", "SKIP_SETCAP=true")
	v.cmd.Stdout, v.cmd.Stderr = &v.log, &v.log
	if err := v.cmd.Start(); err != nil {
		os.RemoveAll(home)
		return nil, err
	}
	go func() { _ = v.cmd.Wait(); close(v.done) }()
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(wctx, http.MethodGet, v.Addr+"/v1/sys/health", nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return v, nil
			}
		}
		select {
		case <-wctx.Done():
			v.Close()
			return nil, fmt.Errorf("vault did not become ready: %w\n%s", wctx.Err(), v.log.String())
		case <-v.done:
			v.Close()
			return nil, fmt.Errorf("vault exited:\n%s", v.log.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Client returns an API client with the root token.
func (v *Vault) Client() (*vault.Client, error) {
	cfg := vault.DefaultConfig()
	cfg.Address = v.Addr
	c, err := vault.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.SetToken(v.RootToken)
	return c, nil
}

// Pause stops the server's process (SIGSTOP) without ending it: Vault keeps
// its state, the kernel still accepts connections, and nothing answers —
// the hardest outage for a client to bound. Resume undoes it.
func (v *Vault) Pause() error { return syscall.Kill(v.cmd.Process.Pid, syscall.SIGSTOP) }

// Resume continues a paused server.
func (v *Vault) Resume() error { return syscall.Kill(v.cmd.Process.Pid, syscall.SIGCONT) }

// Close stops the server and removes its home directory.
func (v *Vault) Close() {
	_ = v.Resume() // a paused server cannot stop
	stopProcess(v.cmd, v.done, syscall.SIGTERM, 10*time.Second)
	os.RemoveAll(v.home)
}
