package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// ErrMissing is returned (wrapped) when a component the environment needs is
// not installed; the message says what to install.
var ErrMissing = errors.New("testenv: component missing")

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// runAs describes the OS user a child process runs as: the postgres user when
// we are root (PostgreSQL refuses root), ourselves otherwise.
type runAs struct {
	cred *syscall.Credential
	uid  int
	gid  int
}

func serverUser() (runAs, error) {
	if os.Geteuid() != 0 {
		return runAs{uid: os.Getuid(), gid: os.Getgid()}, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return runAs{}, fmt.Errorf("%w: running as root needs the 'postgres' OS user (apt-get install postgresql creates it): %v", ErrMissing, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return runAs{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, uid: uid, gid: gid}, nil
}

// command builds a child process in its own process group that is killed if
// we die, running as ra.
func (ra runAs) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: ra.cred}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs a short command and returns its combined output in the error.
func (ra runAs) run(ctx context.Context, name string, args ...string) error {
	cmd := ra.command(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %v: %w\n%s", filepath.Base(name), args, err, out.String())
	}
	return nil
}

// mkdirOwned makes a temp dir owned by ra.
func (ra runAs) mkdirOwned(prefix string) (string, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return "", err
	}
	if err := os.Chown(dir, ra.uid, ra.gid); err != nil {
		os.RemoveAll(dir)
		return "", err
	}
	return dir, nil
}

// stopProcess asks a child to stop with sig, then kills its group after grace.
func stopProcess(cmd *exec.Cmd, done <-chan struct{}, sig syscall.Signal, grace time.Duration) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(grace):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// waitTCP waits until addr accepts a connection or ctx ends.
func waitTCP(ctx context.Context, addr string, exited <-chan struct{}) error {
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", addr, ctx.Err())
		case <-exited:
			return fmt.Errorf("process serving %s exited", addr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
