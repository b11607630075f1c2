package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
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
	"github.com/pgwarden/pgwarden/metrics"
)

// The Kubernetes objects the examples use, with the fields they use; a field
// these types do not know fails the test (a misspelt probe is not ignored).

type objectMeta struct {
	Name        string            `yaml:"name"`
	Namespace   string            `yaml:"namespace"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

type typeMeta struct {
	APIVersion string     `yaml:"apiVersion"`
	Kind       string     `yaml:"kind"`
	Metadata   objectMeta `yaml:"metadata"`
}

type serviceAccount struct {
	typeMeta                     `yaml:",inline"`
	AutomountServiceAccountToken *bool `yaml:"automountServiceAccountToken"`
}

type configMap struct {
	typeMeta `yaml:",inline"`
	Data     map[string]string `yaml:"data"`
}

type deployment struct {
	typeMeta `yaml:",inline"`
	Spec     struct {
		Replicas int `yaml:"replicas"`
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Template struct {
			Metadata objectMeta `yaml:"metadata"`
			Spec     podSpec    `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type podSpec struct {
	ServiceAccountName            string `yaml:"serviceAccountName"`
	AutomountServiceAccountToken  *bool  `yaml:"automountServiceAccountToken"`
	TerminationGracePeriodSeconds int    `yaml:"terminationGracePeriodSeconds"`
	SecurityContext               struct {
		RunAsNonRoot   bool `yaml:"runAsNonRoot"`
		SeccompProfile struct {
			Type string `yaml:"type"`
		} `yaml:"seccompProfile"`
	} `yaml:"securityContext"`
	InitContainers []container `yaml:"initContainers"`
	Containers     []container `yaml:"containers"`
	Volumes        []volume    `yaml:"volumes"`
}

type container struct {
	Name          string   `yaml:"name"`
	Image         string   `yaml:"image"`
	RestartPolicy string   `yaml:"restartPolicy"`
	Args          []string `yaml:"args"`
	Env           []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	StartupProbe   *probe `yaml:"startupProbe"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
	Resources      struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext struct {
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   bool  `yaml:"readOnlyRootFilesystem"`
		Capabilities             struct {
			Drop []string `yaml:"drop"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		SubPath   string `yaml:"subPath"`
		ReadOnly  bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
}

type probe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"`
	} `yaml:"httpGet"`
	InitialDelaySeconds int `yaml:"initialDelaySeconds"`
	PeriodSeconds       int `yaml:"periodSeconds"`
	// TimeoutSeconds is how long the kubelet waits for an answer; unset,
	// Kubernetes waits 1 s.
	TimeoutSeconds   int `yaml:"timeoutSeconds"`
	SuccessThreshold int `yaml:"successThreshold"`
	FailureThreshold int `yaml:"failureThreshold"`
}

type keyToPath struct {
	Key  string `yaml:"key"`
	Path string `yaml:"path"`
}

type volume struct {
	Name      string `yaml:"name"`
	ConfigMap *struct {
		Name  string      `yaml:"name"`
		Items []keyToPath `yaml:"items"`
	} `yaml:"configMap"`
	Secret *struct {
		SecretName string `yaml:"secretName"`
	} `yaml:"secret"`
	Projected *struct {
		Sources []struct {
			ServiceAccountToken *struct {
				Audience          string `yaml:"audience"`
				ExpirationSeconds int    `yaml:"expirationSeconds"`
				Path              string `yaml:"path"`
			} `yaml:"serviceAccountToken"`
			ConfigMap *struct {
				Name  string      `yaml:"name"`
				Items []keyToPath `yaml:"items"`
			} `yaml:"configMap"`
		} `yaml:"sources"`
	} `yaml:"projected"`
}

type service struct {
	typeMeta `yaml:",inline"`
	Spec     struct {
		Selector map[string]string `yaml:"selector"`
		Ports    []struct {
			Name       string `yaml:"name"`
			Port       int    `yaml:"port"`
			TargetPort any    `yaml:"targetPort"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type clusterRoleBinding struct {
	typeMeta `yaml:",inline"`
	RoleRef  struct {
		APIGroup string `yaml:"apiGroup"`
		Kind     string `yaml:"kind"`
		Name     string `yaml:"name"`
	} `yaml:"roleRef"`
	Subjects []struct {
		APIGroup string `yaml:"apiGroup"`
		Kind     string `yaml:"kind"`
		Name     string `yaml:"name"`
	} `yaml:"subjects"`
}

// manifests is one file's objects by kind.
type manifests struct {
	file            string
	serviceAccounts []serviceAccount
	configMaps      []configMap
	deployments     []deployment
	services        []service
	bindings        []clusterRoleBinding
}

// apiVersions are the kinds the examples may use and their API groups.
var apiVersions = map[string]string{
	"ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1",
	"Deployment": "apps/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
}

// decodeStrict decodes one document into v, refusing fields v does not have.
func decodeStrict(doc []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	return dec.Decode(v)
}

func parseManifests(t *testing.T, file string) manifests {
	t.Helper()
	m := manifests{file: filepath.Base(file)}
	dec := yaml.NewDecoder(strings.NewReader(readFile(t, file)))
	for i := 0; ; i++ {
		var node yaml.Node
		if err := dec.Decode(&node); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("%s: %v", m.file, err)
		}
		doc, err := yaml.Marshal(&node)
		if err != nil {
			t.Fatal(err)
		}
		var tm struct {
			APIVersion string `yaml:"apiVersion"`
			Kind       string `yaml:"kind"`
		}
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatal(err)
		}
		where := fmt.Sprintf("%s document %d (%s)", m.file, i+1, tm.Kind)
		if want, ok := apiVersions[tm.Kind]; !ok || want != tm.APIVersion {
			t.Errorf("%s: apiVersion %q kind %q: want one of %v", where, tm.APIVersion, tm.Kind, apiVersions)
			continue
		}
		var obj any
		switch tm.Kind {
		case "ServiceAccount":
			m.serviceAccounts = append(m.serviceAccounts, serviceAccount{})
			obj = &m.serviceAccounts[len(m.serviceAccounts)-1]
		case "ConfigMap":
			m.configMaps = append(m.configMaps, configMap{})
			obj = &m.configMaps[len(m.configMaps)-1]
		case "Deployment":
			m.deployments = append(m.deployments, deployment{})
			obj = &m.deployments[len(m.deployments)-1]
		case "Service":
			m.services = append(m.services, service{})
			obj = &m.services[len(m.services)-1]
		case "ClusterRoleBinding":
			m.bindings = append(m.bindings, clusterRoleBinding{})
			obj = &m.bindings[len(m.bindings)-1]
		}
		if err := decodeStrict(doc, obj); err != nil {
			t.Errorf("%s: %v", where, err)
		}
	}
	return m
}

func (m manifests) meta() []objectMeta {
	var out []objectMeta
	for _, o := range m.serviceAccounts {
		out = append(out, o.Metadata)
	}
	for _, o := range m.configMaps {
		out = append(out, o.Metadata)
	}
	for _, o := range m.deployments {
		out = append(out, o.Metadata)
	}
	for _, o := range m.services {
		out = append(out, o.Metadata)
	}
	return out
}

func (m manifests) configMap(ns, name string) *configMap {
	for i, c := range m.configMaps {
		if c.Metadata.Namespace == ns && c.Metadata.Name == name {
			return &m.configMaps[i]
		}
	}
	return nil
}

// quantity parses a Kubernetes quantity (binary suffixes, or m for CPU).
func quantity(t testing.TB, s string) float64 {
	t.Helper()
	mult := map[string]float64{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "MiB": 1 << 20, "GiB": 1 << 30, "m": 0.001, "": 1}
	m := regexp.MustCompile(`^(\d+(?:\.\d+)?)([A-Za-z]*)$`).FindStringSubmatch(s)
	if m == nil {
		t.Fatalf("quantity %q", s)
	}
	f, err := strconv.ParseFloat(m[1], 64)
	k, ok := mult[m[2]]
	if err != nil || !ok {
		t.Fatalf("quantity %q", s)
	}
	return f * k
}

// pgwardenPod is what checkPgwarden found in a Deployment.
type pgwardenPod struct {
	cfg       *config.Config
	container container
	ports     map[string]int // named container ports
}

// checkPgwarden checks the pgwarden container of d: its config (from a
// ConfigMap in the file) loads with its environment, its probes hit /healthz
// and /readyz on the metrics listener, and it is sized and locked down.
func checkPgwarden(t *testing.T, m manifests, d deployment) pgwardenPod {
	t.Helper()
	spec := d.Spec.Template.Spec
	where := m.file + " Deployment " + d.Metadata.Name
	var pods []container
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if len(c.Args) > 0 && c.Args[0] == "serve" {
			pods = append(pods, c)
		}
	}
	if len(pods) != 1 {
		t.Fatalf("%s: %d pgwarden containers (args serve …)", where, len(pods))
	}
	c := pods[0]
	where += " container " + c.Name
	cfgPath := flagValue(c.Args, "-config")
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	if cfgPath == "" {
		cfgPath = env["PGWARDEN_CONFIG"]
	}
	// The config file: a volume mount's subPath of a ConfigMap in this file.
	var text string
	for _, vm := range c.VolumeMounts {
		if vm.MountPath != cfgPath {
			continue
		}
		for _, v := range spec.Volumes {
			if v.Name == vm.Name && v.ConfigMap != nil {
				if cm := m.configMap(d.Metadata.Namespace, v.ConfigMap.Name); cm != nil {
					text = cm.Data[vm.SubPath]
				}
			}
		}
	}
	if text == "" {
		t.Fatalf("%s: its config %s is not a key of a ConfigMap in %s", where, cfgPath, m.file)
	}
	cfg := loadConfig(t, where, text, env)
	checkEnv(t, where, env, cfg)

	ports := map[string]int{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	metricsPort := port(t, cfg.MetricsListen)
	if host := strings.Split(cfg.MetricsListen, ":")[0]; host != "0.0.0.0" && host != "" {
		t.Errorf("%s: metrics_listen %s: the kubelet probes the pod's address, not loopback", where, cfg.MetricsListen)
	}
	probePort := func(p any) int {
		switch v := p.(type) {
		case int:
			return v
		case string:
			return ports[v]
		}
		return 0
	}
	for _, pr := range []struct {
		name, path string
		p          *probe
	}{{"startupProbe", "/healthz", c.StartupProbe}, {"livenessProbe", "/healthz", c.LivenessProbe}, {"readinessProbe", "/readyz", c.ReadinessProbe}} {
		if pr.p == nil || pr.p.HTTPGet == nil {
			t.Errorf("%s: no %s", where, pr.name)
			continue
		}
		if pr.p.HTTPGet.Path != pr.path || probePort(pr.p.HTTPGet.Port) != metricsPort {
			t.Errorf("%s: %s GET %s on port %v (%d), want %s on the metrics port %d", where, pr.name,
				pr.p.HTTPGet.Path, pr.p.HTTPGet.Port, probePort(pr.p.HTTPGet.Port), pr.path, metricsPort)
		}
		if pr.p.TimeoutSeconds <= 0 {
			t.Errorf("%s: %s has no timeoutSeconds (Kubernetes then waits 1 s)", where, pr.name)
		}
	}
	// /readyz may take its whole budget to answer (a dependency that does
	// not answer is reported when the budget ends): a probe that gives up
	// sooner fails for want of patience and never learns which check failed.
	if rp := c.ReadinessProbe; rp != nil && time.Duration(rp.TimeoutSeconds)*time.Second <= metrics.ReadyTimeout {
		t.Errorf("%s: readinessProbe timeoutSeconds %d: /readyz may take %v to answer", where, rp.TimeoutSeconds, metrics.ReadyTimeout)
	}
	if a := d.Spec.Template.Metadata.Annotations; a["prometheus.io/port"] != strconv.Itoa(metricsPort) || a["prometheus.io/path"] != "/metrics" {
		t.Errorf("%s: scrape annotations %v do not point at the metrics listener %d", where, a, metricsPort)
	}
	// Sized, and within what the Go runtime is told.
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req["cpu"] == "" || req["memory"] == "" || lim["memory"] == "" {
		t.Errorf("%s: resources %+v: want cpu and memory requests and a memory limit", where, c.Resources)
	} else {
		if quantity(t, req["memory"]) > quantity(t, lim["memory"]) {
			t.Errorf("%s: memory request above the limit", where)
		}
		// README, Performance: about 17 MiB resident when idle.
		if quantity(t, req["memory"]) < 24<<20 {
			t.Errorf("%s: memory request %s is under pgwarden's idle footprint and a few clients", where, req["memory"])
		}
		if gml := env["GOMEMLIMIT"]; gml == "" || quantity(t, gml) >= quantity(t, lim["memory"]) {
			t.Errorf("%s: GOMEMLIMIT %q should be set under the memory limit %s", where, gml, lim["memory"])
		}
	}
	sc := c.SecurityContext
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || !sc.ReadOnlyRootFilesystem || !slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) {
		t.Errorf("%s: securityContext %+v is not locked down", where, sc)
	}
	if !spec.SecurityContext.RunAsNonRoot {
		t.Errorf("%s: the pod may run as root", where)
	}
	// The kubelet's SIGKILL comes terminationGracePeriodSeconds after its
	// SIGTERM: pgwarden must have drained (serve -shutdown-grace), stopped
	// its metrics listener and revoked its leases by then.
	grace := app.DefaultShutdownGrace
	if v := flagValue(c.Args, "-shutdown-grace"); v != "" {
		var err error
		if grace, err = time.ParseDuration(v); err != nil {
			t.Errorf("%s: -shutdown-grace %q: %v", where, v, err)
		}
	}
	if slices.ContainsFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "-shutdown-grace=") }) {
		t.Errorf("%s: write -shutdown-grace and its value as two arguments", where)
	}
	if budget := app.StopBudget(grace); time.Duration(spec.TerminationGracePeriodSeconds)*time.Second < budget {
		t.Errorf("%s: terminationGracePeriodSeconds %d: pgwarden may take %v to stop (%v of drain, then the metrics listener and the revocations)",
			where, spec.TerminationGracePeriodSeconds, budget, grace)
	}
	// Files the config names are mounted.
	for _, f := range []struct{ name, path string }{{"tls_cert", cfg.TLSCert}, {"tls_key", cfg.TLSKey}, {"vault.auth.secret_file", cfg.Vault.Auth.SecretFile}} {
		if f.path != "" && !mounted(c, f.path) {
			t.Errorf("%s: %s %s is on no volume mount", where, f.name, f.path)
		}
	}
	for _, d := range cfg.Databases {
		if rc := connParams(d.Upstream)["sslrootcert"]; rc != "" && rc != "system" && !mounted(c, rc) {
			t.Errorf("%s: databases %s sslrootcert %s is on no volume mount", where, d.Name, rc)
		}
	}
	for _, k := range []string{"VAULT_CACERT"} {
		if p := env[k]; p != "" && !mounted(c, p) {
			t.Errorf("%s: %s %s is on no volume mount", where, k, p)
		}
	}
	return pgwardenPod{cfg: cfg, container: c, ports: ports}
}

func mounted(c container, p string) bool {
	for _, vm := range c.VolumeMounts {
		if vm.SubPath == "" && strings.HasPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/") {
			return true
		}
	}
	return false
}

// checkObjects checks what every example file must get right: names,
// namespaces, selectors, images, resources, volumes.
func checkObjects(t *testing.T, m manifests) {
	t.Helper()
	for _, o := range m.meta() {
		if o.Name == "" || o.Namespace == "" {
			t.Errorf("%s: an object without name or namespace: %+v", m.file, o)
		}
	}
	for _, d := range m.deployments {
		where := m.file + " Deployment " + d.Metadata.Name
		sel := d.Spec.Selector.MatchLabels
		if len(sel) == 0 {
			t.Errorf("%s: no selector", where)
		}
		for k, v := range sel {
			if d.Spec.Template.Metadata.Labels[k] != v {
				t.Errorf("%s: selector %s=%s does not match its pods", where, k, v)
			}
		}
		spec := d.Spec.Template.Spec
		volumes := map[string]bool{}
		for _, v := range spec.Volumes {
			volumes[v.Name] = true
		}
		for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
			if !regexp.MustCompile(`:[0-9][A-Za-z0-9._-]*$`).MatchString(c.Image) {
				t.Errorf("%s container %s: image %q is not pinned to a version", where, c.Name, c.Image)
			}
			if c.Resources.Requests["cpu"] == "" || c.Resources.Requests["memory"] == "" {
				t.Errorf("%s container %s: no cpu and memory requests", where, c.Name)
			}
			for _, vm := range c.VolumeMounts {
				if !volumes[vm.Name] {
					t.Errorf("%s container %s: mounts %s, no volume of the pod", where, c.Name, vm.Name)
				}
			}
		}
		for _, c := range spec.InitContainers {
			if c.RestartPolicy != "Always" {
				t.Errorf("%s: init container %s is not a sidecar (restartPolicy Always)", where, c.Name)
			}
		}
		if sa := spec.ServiceAccountName; sa != "" {
			found := false
			for _, s := range m.serviceAccounts {
				found = found || (s.Metadata.Name == sa && s.Metadata.Namespace == d.Metadata.Namespace)
			}
			if !found {
				t.Errorf("%s: service account %s is not in %s", where, sa, m.file)
			}
		}
	}
	for _, s := range m.services {
		where := m.file + " Service " + s.Metadata.Name
		var pods *deployment
		for i, d := range m.deployments {
			match := len(s.Spec.Selector) > 0
			for k, v := range s.Spec.Selector {
				match = match && d.Spec.Template.Metadata.Labels[k] == v
			}
			if match && d.Metadata.Namespace == s.Metadata.Namespace {
				pods = &m.deployments[i]
			}
		}
		if pods == nil {
			t.Errorf("%s: selects no Deployment's pods", where)
			continue
		}
		for _, p := range s.Spec.Ports {
			name, _ := p.TargetPort.(string)
			found := false
			for _, c := range pods.Spec.Template.Spec.Containers {
				for _, cp := range c.Ports {
					found = found || cp.Name == name
				}
			}
			if !found {
				t.Errorf("%s: port %s targets %v, no container port of its pods", where, p.Name, p.TargetPort)
			}
		}
	}
}

func kubeFile(t *testing.T, name string) manifests {
	t.Helper()
	m := parseManifests(t, filepath.Join(repoRoot(t), "deploy/kubernetes", name))
	checkObjects(t, m)
	return m
}

// Every file in deploy/kubernetes parses into the kinds the tests know, and
// each is checked by a test below.
func TestKubernetesFiles(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "deploy/kubernetes/*"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, filepath.Base(f))
		parseManifests(t, f)
	}
	if want := []string{"issuer-discovery.yaml", "shared.yaml", "sidecar.yaml"}; !slices.Equal(names, want) {
		t.Errorf("deploy/kubernetes holds %v; the tests check %v", names, want)
	}
}

// The sidecar: the application's password is its pod's projected
// service-account token, whose audience pgwarden accepts and whose subject a
// level grants, read from the file the application is told about; it talks
// to pgwarden over loopback.
func TestKubernetesSidecar(t *testing.T) {
	m := kubeFile(t, "sidecar.yaml")
	if len(m.deployments) != 1 {
		t.Fatalf("sidecar.yaml: %d Deployments", len(m.deployments))
	}
	d := m.deployments[0]
	pg := checkPgwarden(t, m, d)
	if pg.container.RestartPolicy != "Always" || !slices.ContainsFunc(d.Spec.Template.Spec.InitContainers, func(c container) bool { return c.Name == pg.container.Name }) {
		t.Error("pgwarden is not a native sidecar (an init container with restartPolicy Always)")
	}
	listen, err := netip.ParseAddrPort(pg.cfg.Listen)
	if err != nil || !listen.Addr().IsLoopback() {
		t.Errorf("listen %s: a sidecar serves its own pod only, on loopback", pg.cfg.Listen)
	}
	if pg.cfg.OIDC.GroupsClaim != "sub" {
		t.Errorf("groups_claim %q: a service account's token carries no groups; its subject is the group", pg.cfg.OIDC.GroupsClaim)
	}
	var app *container
	for i, c := range d.Spec.Template.Spec.Containers {
		if c.Name != pg.container.Name {
			app = &d.Spec.Template.Spec.Containers[i]
		}
	}
	if app == nil {
		t.Fatal("no application container")
	}
	env := map[string]string{}
	for _, e := range app.Env {
		env[e.Name] = e.Value
	}
	if env["PGHOST"] != listen.Addr().String() || env["PGPORT"] != strconv.Itoa(int(listen.Port())) {
		t.Errorf("the application connects to %s:%s, pgwarden listens on %s", env["PGHOST"], env["PGPORT"], pg.cfg.Listen)
	}
	// The projected token: where it is mounted, what it is for, how long it lives.
	var tokenFile, audience string
	var expiry int
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken == nil {
				continue
			}
			for _, vm := range app.VolumeMounts {
				if vm.Name == v.Name {
					tokenFile = path.Join(vm.MountPath, s.ServiceAccountToken.Path)
				}
			}
			audience, expiry = s.ServiceAccountToken.Audience, s.ServiceAccountToken.ExpirationSeconds
		}
	}
	if tokenFile == "" {
		t.Fatal("the application mounts no projected service-account token")
	}
	if env["DB_TOKEN_FILE"] != tokenFile {
		t.Errorf("the application reads its password from %q, the token is at %s", env["DB_TOKEN_FILE"], tokenFile)
	}
	if !slices.Contains(pg.cfg.OIDC.Audiences, audience) {
		t.Errorf("the token's audience %q is not one pgwarden accepts (%v)", audience, pg.cfg.OIDC.Audiences)
	}
	if expiry < 600 || expiry > 3600 {
		t.Errorf("expirationSeconds %d: short-lived, and the kubelet's minimum is 600", expiry)
	}
	// The token's subject is granted the level the application asks for, on
	// its database.
	sub := "system:serviceaccount:" + d.Metadata.Namespace + ":" + d.Spec.Template.Spec.ServiceAccountName
	granted := false
	for _, db := range pg.cfg.Databases {
		for _, l := range db.Levels {
			granted = granted || (db.Name == env["PGDATABASE"] && l.Name == env["PGUSER"] && slices.Contains(l.Groups, sub))
		}
	}
	if !granted {
		t.Errorf("no level %s on database %s grants %s", env["PGUSER"], env["PGDATABASE"], sub)
	}
	// pgwarden itself needs no Vault identity here (identity scope), so the
	// pod mounts no API token.
	if pg.cfg.Vault.Auth.Method != "" || d.Spec.Template.Spec.AutomountServiceAccountToken == nil || *d.Spec.Template.Spec.AutomountServiceAccountToken {
		t.Error("the sidecar example holds a Vault identity or an API token it does not need")
	}
}

// The shared proxy: a Service in front of TLS-only pgwarden pods with their
// own Vault identity through Kubernetes auth.
func TestKubernetesShared(t *testing.T) {
	m := kubeFile(t, "shared.yaml")
	if len(m.deployments) != 1 || len(m.services) != 1 {
		t.Fatalf("shared.yaml: %d Deployments, %d Services", len(m.deployments), len(m.services))
	}
	d, s := m.deployments[0], m.services[0]
	pg := checkPgwarden(t, m, d)
	if pg.cfg.TLSCert == "" || pg.cfg.AllowCleartextUntrusted {
		t.Error("a shared pgwarden must take tokens over TLS only")
	}
	if d.Spec.Replicas < 2 {
		t.Errorf("replicas %d: a shared proxy wants more than one", d.Spec.Replicas)
	}
	listen := port(t, pg.cfg.Listen)
	for _, p := range s.Spec.Ports {
		name, _ := p.TargetPort.(string)
		want := map[string]int{"postgres": listen, "metrics": port(t, pg.cfg.MetricsListen)}[p.Name]
		if pg.ports[name] != want || want == 0 {
			t.Errorf("Service port %s targets %s (%d), pgwarden listens on %d", p.Name, name, pg.ports[name], want)
		}
	}
	// Kubernetes auth logs in with the pod's service-account token, at the
	// default path unless secret_file says otherwise.
	if pg.cfg.Vault.Auth.Method != "kubernetes" || pg.cfg.Vault.Auth.Role == "" {
		t.Errorf("vault.auth %+v: the example shows Vault's kubernetes auth", pg.cfg.Vault.Auth)
	}
	if a := d.Spec.Template.Spec.AutomountServiceAccountToken; a != nil && !*a && pg.cfg.Vault.Auth.SecretFile == "" {
		t.Error("Kubernetes auth needs the service-account token the pod does not mount")
	}
	for _, sa := range m.serviceAccounts {
		if a := sa.AutomountServiceAccountToken; a != nil && !*a && sa.Metadata.Name == d.Spec.Template.Spec.ServiceAccountName {
			t.Error("Kubernetes auth needs the service-account token the account does not mount")
		}
	}
	roleScoped := false
	for _, db := range pg.cfg.Databases {
		for _, l := range db.Levels {
			roleScoped = roleScoped || l.Scope == config.ScopeRole
		}
	}
	if !roleScoped {
		t.Error("no level in role scope uses pgwarden's own Vault identity")
	}
}

// Issuer discovery for unauthenticated callers, as the Kubernetes
// documentation gives it.
func TestKubernetesIssuerDiscovery(t *testing.T) {
	m := parseManifests(t, filepath.Join(repoRoot(t), "deploy/kubernetes/issuer-discovery.yaml"))
	if len(m.bindings) != 1 {
		t.Fatalf("%d ClusterRoleBindings", len(m.bindings))
	}
	b := m.bindings[0]
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != "system:service-account-issuer-discovery" || b.RoleRef.APIGroup != "rbac.authorization.k8s.io" {
		t.Errorf("roleRef %+v", b.RoleRef)
	}
	if len(b.Subjects) != 1 || b.Subjects[0].Kind != "Group" || b.Subjects[0].Name != "system:unauthenticated" {
		t.Errorf("subjects %+v", b.Subjects)
	}
}

// A misspelt field is refused, not ignored.
func TestKubernetesStrictFields(t *testing.T) {
	doc := "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: y}\nspec:\n  template:\n    spec:\n      containers:\n        - name: a\n          readinesProbe: {}\n"
	var d deployment
	if err := decodeStrict([]byte(doc), &d); err == nil {
		t.Fatal("readinesProbe was accepted")
	}
}
