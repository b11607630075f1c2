// Package metrics owns pgwarden's Prometheus collectors on a registry of its
// own (never the global one) and the HTTP side: /metrics, /healthz, /readyz.
// Other packages do not import Prometheus: proxy and broker report through
// small hooks (proxy.Observer, broker.Config.ObserveVault) that *Metrics
// implements, and pool sizes are read from a snapshot function at scrape time.
//
// Labels are bounded: database, access level, result, operation. Never a
// subject, token or credential.
package metrics

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds the collectors. Its methods are safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	clientsOpen   prometheus.Gauge
	clientsTotal  prometheus.Counter
	authTotal     *prometheus.CounterVec
	vaultDuration *prometheus.HistogramVec
	vaultErrors   *prometheus.CounterVec
	reloads       *prometheus.CounterVec

	ready atomic.Pointer[[]Check] // see SetReadiness
}

// PoolSize is one pool's size at scrape time.
type PoolSize struct {
	Database, Level string
	Idle, Active    int
}

// New registers pgwarden's collectors, plus the Go and process collectors,
// on a fresh registry. pools is called at scrape time; it may be nil.
func New(pools func() []PoolSize) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.clientsOpen = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "pgwarden_client_connections", Help: "Client connections open now."})
	m.clientsTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pgwarden_client_connections_total", Help: "Client connections accepted."})
	m.authTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_auth_total", Help: "Authentication outcomes by database, access level and result (ok or the reason for refusal)."},
		[]string{"database", "level", "result"})
	m.vaultDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "pgwarden_vault_request_duration_seconds", Help: "Vault calls by operation (login, creds).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}},
		[]string{"op"})
	m.vaultErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_vault_request_errors_total", Help: "Failed Vault calls by operation."},
		[]string{"op"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_config_reloads_total", Help: "Configuration reloads (SIGHUP or the console's RELOAD) by result (ok, rejected)."},
		[]string{"result"})
	m.reg.MustRegister(m.clientsOpen, m.clientsTotal, m.authTotal, m.vaultDuration, m.vaultErrors, m.reloads,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if pools != nil {
		m.reg.MustRegister(&poolCollector{pools: pools})
	}
	return m
}

// Registry returns the registry, for tests and extra collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ClientConnected implements proxy.Observer.
func (m *Metrics) ClientConnected() { m.clientsOpen.Inc(); m.clientsTotal.Inc() }

// ClientClosed implements proxy.Observer.
func (m *Metrics) ClientClosed() { m.clientsOpen.Dec() }

// AuthResult implements proxy.Observer.
func (m *Metrics) AuthResult(database, level, result string) {
	m.authTotal.WithLabelValues(database, level, result).Inc()
}

// ObserveVault is the broker's hook for Vault call latency. A negative d
// means the call's duration is not known (renewals vault/api's
// LifetimeWatcher makes): only an error is counted.
func (m *Metrics) ObserveVault(op string, d time.Duration, err error) {
	if d >= 0 {
		m.vaultDuration.WithLabelValues(op).Observe(d.Seconds())
	}
	if err != nil {
		m.vaultErrors.WithLabelValues(op).Inc()
	}
}

// ConfigReloaded counts one reload attempt; result is "ok" or "rejected".
func (m *Metrics) ConfigReloaded(result string) { m.reloads.WithLabelValues(result).Inc() }

// Handler serves /metrics, /healthz (the process is up) and /readyz (every
// readiness check passes; see SetReadiness).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", m.readyz)
	return mux
}

type poolCollector struct{ pools func() []PoolSize }

var poolDesc = prometheus.NewDesc("pgwarden_pool_connections", "Upstream connections by database, access level and state (idle, active).",
	[]string{"database", "level", "state"}, nil)

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) { ch <- poolDesc }

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.pools() {
		ch <- prometheus.MustNewConstMetric(poolDesc, prometheus.GaugeValue, float64(p.Idle), p.Database, p.Level, "idle")
		ch <- prometheus.MustNewConstMetric(poolDesc, prometheus.GaugeValue, float64(p.Active), p.Database, p.Level, "active")
	}
}
