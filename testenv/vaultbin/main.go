// Command vault is HashiCorp Vault built from its Go module, so that testenv and
// `make dev` can run a real Vault dev server without downloading a prebuilt binary.
//
// It lives in a nested module (its own go.mod) so that pgwarden's own module
// does not inherit Vault's dependency tree. See testenv/vaultbin/go.mod for the
// pins and why they are what they are.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() {
	os.Exit(command.Run(os.Args[1:]))
}
