package pgerror

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCodeWalksWrapChain(t *testing.T) {
	t.Parallel()
	tagged := Wrap(io.EOF, InvalidPassword, "token rejected")
	wrapped := fmt.Errorf("authenticate: %w", tagged)
	if got := Code(wrapped); got != InvalidPassword {
		t.Fatalf("Code = %q, want %q", got, InvalidPassword)
	}
	if !errors.Is(wrapped, io.EOF) {
		t.Fatal("cause lost in the chain")
	}
	if From(wrapped).Message != "token rejected" {
		t.Fatalf("message = %q", From(wrapped).Message)
	}
}

func TestUntaggedErrorHidesItsText(t *testing.T) {
	t.Parallel()
	pe := From(errors.New("dial tcp 10.0.0.1: secret-ish detail"))
	if pe.Code != InternalError || pe.Message != "pgwarden internal error" {
		t.Fatalf("got %q %q", pe.Code, pe.Message)
	}
	if From(nil) != nil || Wrap(nil, InternalError, "x") != nil {
		t.Fatal("nil must stay nil")
	}
}

func TestClipKeepsShortTextAndCutsLongAtARune(t *testing.T) {
	t.Parallel()
	if got := Clip("app"); got != "app" {
		t.Fatalf("Clip(app) = %q", got)
	}
	long := strings.Repeat("é", 100) // 2 bytes each
	got := Clip(long)
	if !utf8.ValidString(got) || len(got) > clipLen+len("…") || !strings.HasSuffix(got, "…") {
		t.Fatalf("Clip(200 bytes) = %q (%d bytes)", got, len(got))
	}
}
