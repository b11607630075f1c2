package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/testenv"
)

// TestMakeDevQuickStart is the README's quick start as a test: `make dev`
// reaches ready, psql works with a token from bin/devtoken, and Ctrl-C leaves
// no process, no temp dir and no env file behind.
func TestMakeDevQuickStart(t *testing.T) {
	testenv.Integration(t)
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatal("psql not found: install Debian's postgresql-client (make deps)")
	}
	// Everything the stack creates goes under base: TMPDIR for its temp dirs,
	// dev for .dev. The postgres OS user must be able to traverse it.
	base, err := os.MkdirTemp("", "pgwarden-devtest-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	tmp := filepath.Join(base, "tmp")
	dev := filepath.Join(base, "dev")
	for _, d := range []string{base, tmp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	var out testenv.LockedBuffer
	mk := exec.Command("make", "-s", "dev", "DEV_DIR="+dev, "DEV_PORT=0", "DEV_METRICS_PORT=0")
	mk.Dir = root
	mk.Env = append(os.Environ(), "TMPDIR="+tmp)
	mk.Stdout, mk.Stderr = &out, &out
	mk.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // a terminal's foreground group
	if err := mk.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- mk.Wait() }()
	defer func() {
		select {
		case <-exited:
		default:
			_ = syscall.Kill(-mk.Process.Pid, syscall.SIGKILL)
		}
	}()

	envFile := filepath.Join(dev, "env")
	deadline := time.Now().Add(5 * time.Minute) // a cold machine builds bin/ first
	for {
		if _, err := os.Stat(envFile); err == nil {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("make dev exited before ready: %v\n%s", err, out.String())
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("make dev not ready after 5 minutes\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), "devstack: ready") {
		t.Errorf("no ready line in make dev's output:\n%s", out.String())
	}

	env := append(os.Environ(), readEnv(t, envFile)...)
	tok := exec.Command(filepath.Join(root, "bin", "devtoken"), "--sub", "alice", "--groups", "analyst")
	tok.Env = env
	token, err := tok.Output()
	if err != nil {
		t.Fatalf("devtoken: %v", err)
	}
	psql := exec.Command("psql", "-X", "-A", "-t", "-U", "reader", "-c", "select current_user")
	psql.Env = append(env, "PGPASSWORD="+strings.TrimSpace(string(token)))
	got, err := psql.CombinedOutput()
	if err != nil {
		t.Fatalf("psql through the dev stack: %v\n%s", err, got)
	}
	if user := strings.TrimSpace(string(got)); user == "" || user == "reader" {
		t.Fatalf("current_user = %q, want a Vault-issued role", user)
	}

	started := descendants(mk.Process.Pid)
	if len(started) < 4 {
		t.Fatalf("found %d processes under make dev, want devstack, postgres, vault and pgwarden at least", len(started))
	}
	// Ctrl-C: SIGINT to the foreground process group.
	if err := syscall.Kill(-mk.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("make dev still running 60s after Ctrl-C\n%s", out.String())
	}
	for _, pid := range started {
		if alive(pid) {
			t.Errorf("process %d (%s) outlived make dev", pid, comm(pid))
		}
	}
	if _, err := os.Stat(envFile); !os.IsNotExist(err) {
		t.Error(".dev/env left behind")
	}
	if _, err := os.Stat(dev); !os.IsNotExist(err) {
		t.Error(".dev left behind")
	}
	if left, _ := os.ReadDir(tmp); len(left) > 0 {
		t.Errorf("temp dirs left behind: %v", left)
	}
}

func readEnv(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := sc.Text(); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

// descendants lists every process below pid, from /proc.
func descendants(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp := ppid(p); pp > 0 {
			children[pp] = append(children[pp], p)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// stat returns the fields of /proc/pid/stat after the command name.
func stat(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

func ppid(pid int) int {
	f := stat(pid)
	if len(f) < 2 {
		return 0
	}
	p, _ := strconv.Atoi(f[1])
	return p
}

// alive is true for a running process; a zombie has exited.
func alive(pid int) bool {
	f := stat(pid)
	return len(f) > 0 && f[0] != "Z"
}

func comm(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	return strings.TrimSpace(string(b))
}
