package testenv

import (
	"encoding/json"
	"net"
	"os"
)

// WriteConfig writes the stack's pgwarden config as JSON to path. It holds no
// secret: the admin password is named by an environment variable.
func (s *Stack) WriteConfig(path string) error {
	b, err := json.MarshalIndent(s.Config, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o600)
}

func splitAddr(addr string) (host, port string) {
	host, port, _ = net.SplitHostPort(addr)
	return host, port
}
