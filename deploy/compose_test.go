package deploy

import (
	"bytes"
	"encoding/json"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// composeFile is the part of docker-compose.yml the tests look at; Compose
// itself (TestComposeConfigAccepted) checks the whole.
type composeFile struct {
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
}

type composeService struct {
	Image string `yaml:"image"`
	Build *struct {
		Context string `yaml:"context"`
		Target  string `yaml:"target"`
	} `yaml:"build"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	Volumes     []string          `yaml:"volumes"`
	Ports       []string          `yaml:"ports"`
	DependsOn   yaml.Node         `yaml:"depends_on"`
	StopGrace   string            `yaml:"stop_grace_period"`
	Healthcheck struct {
		Test    []string `yaml:"test"`
		Disable bool     `yaml:"disable"`
	} `yaml:"healthcheck"`
}

func readCompose(t testing.TB) composeFile {
	t.Helper()
	var c composeFile
	if err := yaml.Unmarshal([]byte(readFile(t, filepath.Join(repoRoot(t), "docker-compose.yml"))), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// flagValue is the value after flag in args ("" when absent).
func flagValue(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// mount is one entry of a service's volumes: a bind of a host path
// (relative to the compose file) or a named volume.
type mount struct {
	source, target string
	bind           bool
}

func mounts(s composeService) []mount {
	var out []mount
	for _, v := range s.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) < 2 {
			continue
		}
		out = append(out, mount{source: parts[0], target: parts[1], bind: strings.HasPrefix(parts[0], ".") || strings.HasPrefix(parts[0], "/")})
	}
	return out
}

// hostPath maps a path inside the container to the host path bound there,
// relative to the repository ("" when no bind covers it).
func hostPath(s composeService, inContainer string) string {
	for _, m := range mounts(s) {
		if !m.bind {
			continue
		}
		if inContainer == m.target {
			return m.source
		}
		if rest, ok := strings.CutPrefix(inContainer, m.target+"/"); ok {
			return path.Join(m.source, rest)
		}
	}
	return ""
}

// volumeAt names the named volume whose mount covers p in s ("" when none).
func volumeAt(s composeService, p string) string {
	for _, m := range mounts(s) {
		if !m.bind && (p == m.target || strings.HasPrefix(p, m.target+"/")) {
			return m.source
		}
	}
	return ""
}

// dependsOn lists the services s waits for, with their conditions
// ("service_started" for the list form).
func dependsOn(t testing.TB, s composeService) map[string]string {
	t.Helper()
	out := map[string]string{}
	switch s.DependsOn.Kind {
	case 0:
	case yaml.SequenceNode:
		var names []string
		if err := s.DependsOn.Decode(&names); err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			out[n] = "service_started"
		}
	case yaml.MappingNode:
		var m map[string]struct {
			Condition string `yaml:"condition"`
		}
		if err := s.DependsOn.Decode(&m); err != nil {
			t.Fatal(err)
		}
		for n, c := range m {
			out[n] = c.Condition
		}
	}
	return out
}

// composePgwarden returns the services that run the pgwarden image with a
// config file, each with the config it loads (through config.Load, with the
// service's environment) and the file's path in the repository.
func composePgwarden(t *testing.T, c composeFile) map[string]*config.Config {
	t.Helper()
	out := map[string]*config.Config{}
	for name, s := range c.Services {
		if s.Build == nil || s.Build.Target != "pgwarden" {
			continue
		}
		if len(s.Command) == 0 || !slices.Contains([]string{"serve", "vault-init", "check"}, s.Command[0]) {
			t.Errorf("service %s runs the pgwarden image with %v: not a pgwarden command", name, s.Command)
			continue
		}
		inContainer := flagValue(s.Command, "-config")
		if inContainer == "" {
			inContainer = s.Environment["PGWARDEN_CONFIG"]
		}
		src := hostPath(s, inContainer)
		if src == "" {
			t.Errorf("service %s: its config %q is not bound from the repository", name, inContainer)
			continue
		}
		text := readFile(t, filepath.Join(repoRoot(t), src))
		cfg := loadConfig(t, "service "+name+" ("+src+")", text, s.Environment)
		checkEnv(t, "service "+name, s.Environment, cfg)
		out[name] = cfg
	}
	if len(out) == 0 {
		t.Fatal("no service runs pgwarden with a config file")
	}
	return out
}

// The compose file's pgwarden settings are ones pgwarden reads, and its
// config file passes pgwarden's validation, so the file cannot drift from
// the code.
func TestComposePgwardenConfig(t *testing.T) {
	c := readCompose(t)
	cfgs := composePgwarden(t, c)
	for _, name := range []string{"pgwarden", "vault-init"} {
		if cfgs[name] == nil {
			t.Fatalf("service %s does not run pgwarden with a config", name)
		}
	}
	if got := c.Services["pgwarden"].Command[0]; got != "serve" {
		t.Errorf("pgwarden runs %q", got)
	}
	if got := c.Services["vault-init"].Command[0]; got != "vault-init" {
		t.Errorf("vault-init runs %q", got)
	}
	// vault-init writes each connection's admin password: the variable the
	// config names must be set there, and to the password PostgreSQL's init
	// gives vault_admin.
	vi := c.Services["vault-init"]
	for _, d := range cfgs["vault-init"].Databases {
		pw := vi.Environment[d.Admin.PasswordEnv]
		if pw == "" {
			t.Errorf("vault-init: %s (databases %s admin.password_env) is not set", d.Admin.PasswordEnv, d.Name)
		}
		if got := c.Services["postgres"].Environment["VAULT_ADMIN_PASSWORD"]; got != pw {
			t.Errorf("postgres creates vault_admin with another password than vault-init gives Vault")
		}
		if d.Admin.Username != "vault_admin" {
			t.Errorf("databases %s admin.username %q: init.sql creates vault_admin", d.Name, d.Admin.Username)
		}
	}
	if vi.Environment["VAULT_TOKEN"] != c.Services["vault"].Environment["VAULT_DEV_ROOT_TOKEN_ID"] {
		t.Error("vault-init's VAULT_TOKEN is not the dev server's root token")
	}
	if dependsOn(t, c.Services["pgwarden"])["vault-init"] != "service_completed_successfully" {
		t.Error("pgwarden does not wait for vault-init to finish")
	}
	for _, dep := range []string{"postgres", "vault"} {
		if dependsOn(t, vi)[dep] != "service_healthy" {
			t.Errorf("vault-init does not wait for %s to be healthy", dep)
		}
	}
	if !vi.Healthcheck.Disable {
		t.Error("vault-init exits when done: the image's healthcheck must be disabled for it")
	}
}

// Hosts, ports, certificates and trust agree across the services.
func TestComposeWiring(t *testing.T) {
	c := readCompose(t)
	cfg := composePgwarden(t, c)["pgwarden"]
	pg, is, v := c.Services["pgwarden"], c.Services["issuer"], c.Services["vault"]

	// The issuer pgwarden verifies tokens of is the issuer service, on the
	// port it listens on, under a name its certificate has.
	iss, err := url.Parse(cfg.OIDC.IssuerURL)
	if err != nil {
		t.Fatal(err)
	}
	if iss.Scheme != "https" || flagValue(is.Command, "-url") != cfg.OIDC.IssuerURL {
		t.Errorf("oidc.issuer_url %s, the issuer serves as %s", cfg.OIDC.IssuerURL, flagValue(is.Command, "-url"))
	}
	if _, ok := c.Services[iss.Hostname()]; !ok {
		t.Errorf("oidc.issuer_url host %s is no service", iss.Hostname())
	}
	if port(t, flagValue(is.Command, "-listen")) != mustAtoi(t, iss.Port()) {
		t.Errorf("the issuer listens on %s, pgwarden reaches it on port %s", flagValue(is.Command, "-listen"), iss.Port())
	}
	hosts := strings.Split(flagValue(is.Command, "-hosts"), ",")
	for _, h := range []string{iss.Hostname(), "pgwarden", "localhost"} {
		if !slices.Contains(hosts, h) {
			t.Errorf("the certificate the issuer makes is not for %s (-hosts %v)", h, hosts)
		}
	}
	// pgwarden's TLS pair is the one the issuer writes to the shared volume.
	certs := volumeAt(is, flagValue(is.Command, "-certs"))
	if certs == "" {
		t.Fatal("the issuer's -certs is not on a named volume")
	}
	certDir := flagValue(is.Command, "-certs")
	for _, f := range []struct{ name, path string }{{"tls_cert", cfg.TLSCert}, {"tls_key", cfg.TLSKey}} {
		if volumeAt(pg, f.path) != certs || !slices.Contains([]string{certDir + "/server.crt", certDir + "/server.key"}, f.path) {
			t.Errorf("%s %s is not the issuer's server certificate in volume %s", f.name, f.path, certs)
		}
	}
	// pgwarden (for the issuer's JWKS) and Vault (for its JWT auth method)
	// trust the issuer's CA.
	for name, s := range map[string]composeService{"pgwarden": pg, "vault": v} {
		ca := s.Environment["SSL_CERT_FILE"]
		if ca != certDir+"/ca.crt" || volumeAt(s, ca) != certs {
			t.Errorf("%s: SSL_CERT_FILE %q is not the issuer's CA in volume %s", name, ca, certs)
		}
	}
	// Go reads its trusted CAs once: Vault must start after the issuer
	// wrote its CA (pgwarden comes after vault-init, after Vault).
	if dependsOn(t, v)["issuer"] != "service_healthy" {
		t.Error("Vault may start before the issuer has written its CA")
	}
	// Vault: the address in the config is the vault service's listener.
	va, err := url.Parse(cfg.Vault.Address)
	if err != nil {
		t.Fatal(err)
	}
	if va.Hostname() != "vault" || port(t, v.Environment["VAULT_DEV_LISTEN_ADDRESS"]) != mustAtoi(t, va.Port()) {
		t.Errorf("vault.address %s, Vault listens on %s", cfg.Vault.Address, v.Environment["VAULT_DEV_LISTEN_ADDRESS"])
	}
	// PostgreSQL: the upstream and Vault's connection are the postgres service.
	for _, d := range cfg.Databases {
		p := connParams(d.Upstream)
		if p["host"] != "postgres" || p["port"] != "5432" {
			t.Errorf("databases %s upstream %q is not the postgres service", d.Name, d.Upstream)
		}
		if !strings.Contains(d.Admin.ConnectionURL, "@postgres:5432/"+p["dbname"]+"?") {
			t.Errorf("databases %s admin.connection_url is not the postgres service's %s", d.Name, p["dbname"])
		}
	}
	// Ports: what pgwarden listens on is what is published, probed and scraped.
	listen, metricsPort := port(t, cfg.Listen), port(t, cfg.MetricsListen)
	var published []int
	for _, p := range pg.Ports {
		parts := strings.Split(p, ":")
		if parts[0] != "127.0.0.1" {
			t.Errorf("pgwarden publishes %s beyond loopback", p)
		}
		published = append(published, mustAtoi(t, parts[len(parts)-1]))
	}
	if !slices.Contains(published, listen) || !slices.Contains(published, metricsPort) {
		t.Errorf("pgwarden listens on %d and %d, publishes %v", listen, metricsPort, published)
	}
	if hc := strings.Join(pg.Healthcheck.Test, " "); !strings.Contains(hc, "healthprobe") || !strings.Contains(hc, ":"+strconv.Itoa(metricsPort)+"/healthz") {
		t.Errorf("pgwarden's healthcheck %q does not probe /healthz on the metrics port %d", hc, metricsPort)
	}
	if hc := strings.Join(is.Healthcheck.Test, " "); !strings.Contains(hc, "https://localhost:"+iss.Port()+"/") || !strings.Contains(hc, certDir+"/ca.crt") {
		t.Errorf("the issuer's healthcheck %q does not reach it over https with its CA", hc)
	}
	prom := readFile(t, filepath.Join(repoRoot(t), hostPath(c.Services["prometheus"], "/etc/prometheus/prometheus.yml")))
	if !strings.Contains(prom, `"pgwarden:`+strconv.Itoa(metricsPort)+`"`) {
		t.Errorf("Prometheus does not scrape pgwarden:%d", metricsPort)
	}
	// Clients come from the host through Docker's port forwarding, never
	// from loopback as pgwarden sees it: TLS is what lets them send a token.
	if cfg.TLSCert == "" || cfg.AllowCleartextUntrusted {
		t.Error("pgwarden in compose must offer TLS and keep cleartext tokens to loopback")
	}
}

func mustAtoi(t testing.TB, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// `docker compose up` is `make dev`: the same levels, groups, statements and
// TTLs, and the same seed in PostgreSQL.
func TestComposeIsMakeDev(t *testing.T) {
	c := readCompose(t)
	cfg := composePgwarden(t, c)["pgwarden"]
	if len(cfg.Databases) != 1 || cfg.Databases[0].Name != "app" {
		t.Fatalf("compose databases: %+v", cfg.Databases)
	}
	// testenv.Levels through the same Load, for the same defaults.
	b, err := json.Marshal(config.Config{
		OIDC:      config.OIDC{IssuerURL: "https://issuer.example", Audiences: []string{testenv.Audience}},
		Databases: []config.Database{{Name: "app", Upstream: "host=127.0.0.1", Levels: testenv.Levels()}},
	})
	if err != nil {
		t.Fatal(err)
	}
	dev := loadConfig(t, "make dev's levels", string(b), nil)
	got, want := cfg.Databases[0].Levels, dev.Databases[0].Levels
	gj, _ := json.MarshalIndent(got, "", " ")
	wj, _ := json.MarshalIndent(want, "", " ")
	if !bytes.Equal(gj, wj) {
		t.Errorf("compose levels differ from make dev's (testenv.Levels):\n%s\nwant\n%s", gj, wj)
	}
	if !slices.Equal(cfg.OIDC.Audiences, []string{testenv.Audience}) || !slices.Equal(cfg.Console.Groups, []string{"dba"}) {
		t.Errorf("audiences %v, console groups %v: make dev's are [%s], [dba]", cfg.OIDC.Audiences, cfg.Console.Groups, testenv.Audience)
	}
	sql := readFile(t, filepath.Join(repoRoot(t), "deploy/compose/postgres/init.sql"))
	for _, stmt := range testenv.Seed {
		if !strings.Contains(sql, stmt+";") {
			t.Errorf("init.sql lacks testenv.Seed's %q", stmt)
		}
	}
	for _, line := range strings.Split(testenv.SeedApp, "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.Contains(sql, line) {
			t.Errorf("init.sql lacks testenv.SeedApp's %q", line)
		}
	}
	if !strings.Contains(sql, `\connect app`) {
		t.Error("init.sql does not seed inside database app")
	}
	if hostPath(c.Services["postgres"], "/docker-entrypoint-initdb.d/init.sql") != "./deploy/compose/postgres/init.sql" {
		t.Error("the postgres service does not run deploy/compose/postgres/init.sql")
	}
}

// Images are pinned: each is built here or names a version; PostgreSQL is
// the major version the tests count on, Vault the version testenv builds.
func TestComposeImagesPinned(t *testing.T) {
	c := readCompose(t)
	stages := dockerStages(t)
	tagged := regexp.MustCompile(`^[a-z0-9./_-]+:([A-Za-z0-9._-]+)$`)
	for name, s := range c.Services {
		if s.Build != nil {
			if s.Build.Context != "." || !stages[s.Build.Target] {
				t.Errorf("service %s builds target %q of %q: not a stage of the Dockerfile", name, s.Build.Target, s.Build.Context)
			}
			continue
		}
		m := tagged.FindStringSubmatch(s.Image)
		if m == nil || m[1] == "latest" || !regexp.MustCompile(`\d+\.\d+`).MatchString(m[1]) {
			t.Errorf("service %s: image %q is not pinned to a version", name, s.Image)
		}
	}
	if img := c.Services["postgres"].Image; !strings.HasPrefix(img, "postgres:15.") {
		t.Errorf("postgres image %s: the tests and make dev use PostgreSQL 15", img)
	}
	gomod := readFile(t, filepath.Join(repoRoot(t), "testenv/vaultbin/go.mod"))
	m := regexp.MustCompile(`(?m)^(?:require)?\s*github\.com/hashicorp/vault v(\S+)`).FindStringSubmatch(gomod)
	if m == nil {
		t.Fatal("testenv/vaultbin/go.mod pins no github.com/hashicorp/vault")
	}
	if img := c.Services["vault"].Image; img != "hashicorp/vault:"+m[1] {
		t.Errorf("vault image %s, testenv builds Vault %s", img, m[1])
	}
	// Bind mounts name files and directories of the repository.
	for name, s := range c.Services {
		for _, mt := range mounts(s) {
			if !mt.bind {
				if _, ok := c.Volumes[mt.source]; !ok {
					t.Errorf("service %s mounts volume %s, which is not declared", name, mt.source)
				}
				continue
			}
			if _, err := os.Stat(filepath.Join(repoRoot(t), mt.source)); err != nil {
				t.Errorf("service %s mounts %s: %v", name, mt.source, err)
			}
		}
	}
}

// Grafana gets the provisioning and the dashboard it is pointed at.
func TestComposeGrafana(t *testing.T) {
	c := readCompose(t)
	g := c.Services["grafana"]
	home := g.Environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
	if p := hostPath(g, home); p == "" {
		t.Errorf("Grafana's home dashboard %s is not mounted", home)
	} else if _, err := os.Stat(filepath.Join(repoRoot(t), p)); err != nil {
		t.Error(err)
	}
	prov := readFile(t, filepath.Join(repoRoot(t), hostPath(g, "/etc/grafana/provisioning/dashboards/pgwarden.yml")))
	m := regexp.MustCompile(`path:\s*(\S+)`).FindStringSubmatch(prov)
	if m == nil || hostPath(g, m[1]) != "./deploy/grafana/dashboards" {
		t.Errorf("the dashboards provider's path is not where the dashboards are mounted: %v", m)
	}
	ds := readFile(t, filepath.Join(repoRoot(t), hostPath(g, "/etc/grafana/provisioning/datasources/prometheus.yml")))
	if !strings.Contains(ds, "uid: "+dashboardDatasourceDefault(t)) || !strings.Contains(ds, "url: http://prometheus:9090") {
		t.Errorf("the provisioned data source is not the dashboard's default or not the prometheus service:\n%s", ds)
	}
}

// composeCommand finds Compose: the docker CLI's plugin, or Debian's
// docker-compose, which `make deps` installs. In CI a missing one fails.
func composeCommand(t *testing.T) []string {
	t.Helper()
	if exec.Command("docker", "compose", "version").Run() == nil {
		return []string{"docker", "compose"}
	}
	if p, err := exec.LookPath("docker-compose"); err == nil {
		return []string{p}
	}
	if testenv.InCI() {
		t.Fatal("neither `docker compose` nor docker-compose found: install Debian's docker-compose (make deps)")
	}
	t.Skip("neither `docker compose` nor docker-compose found (make deps installs Debian's docker-compose)")
	return nil
}

// Compose itself accepts docker-compose.yml (needing no Docker engine),
// and refuses a file with a mistake, so the check is one that can fail.
func TestComposeConfigAccepted(t *testing.T) {
	cmd := composeCommand(t)
	run := func(dir string, args ...string) (string, error) {
		c := exec.Command(cmd[0], append(cmd[1:], args...)...)
		c.Dir = dir
		c.Env = append(os.Environ(), "COMPOSE_PROJECT_NAME=pgwarden-test")
		var out bytes.Buffer
		c.Stdout, c.Stderr = &out, &out
		done := make(chan error, 1)
		if err := c.Start(); err != nil {
			return "", err
		}
		go func() { done <- c.Wait() }()
		select {
		case err := <-done:
			return out.String(), err
		case <-time.After(2 * time.Minute):
			_ = c.Process.Kill()
			return out.String(), <-done
		}
	}
	if out, err := run(repoRoot(t), "-f", "docker-compose.yml", "config", "-q"); err != nil {
		t.Fatalf("%v config refuses docker-compose.yml: %v\n%s", cmd, err, out)
	}
	bad := t.TempDir()
	if err := os.WriteFile(filepath.Join(bad, "docker-compose.yml"), []byte("services:\n  x:\n    image: busybox:1.36\n    helthcheck: {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run(bad, "-f", "docker-compose.yml", "config", "-q"); err == nil {
		t.Fatalf("%v config accepted a misspelt key:\n%s", cmd, out)
	}
}

// TestComposeStopGraceCoversTheDrain: Docker's SIGKILL comes after the
// pgwarden service's stop_grace_period; its stop (the default shutdown
// grace, the metrics listener, the revocations) must fit in it.
func TestComposeStopGraceCoversTheDrain(t *testing.T) {
	svc := readCompose(t).Services["pgwarden"]
	d, err := time.ParseDuration(svc.StopGrace)
	if err != nil {
		t.Fatalf("pgwarden's stop_grace_period %q: %v (Docker's default, 10s, cuts the drain short)", svc.StopGrace, err)
	}
	if budget := app.StopBudget(app.DefaultShutdownGrace); d < budget {
		t.Fatalf("stop_grace_period %v is shorter than pgwarden's stop, %v", d, budget)
	}
}
