package metrics

import (
	"context"
	"net/http"
	"time"
)

// readyz answers 200 while the readiness check passes, 503 before it is set
// or while it fails.
func (m *Metrics) readyz(w http.ResponseWriter, r *http.Request) {
	check := m.ready.Load()
	if check == nil {
		http.Error(w, "starting", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := (*check)(ctx); err != nil {
		http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ready\n"))
}
