package deploy

import (
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// dockerStages names the Dockerfile's stages.
func dockerStages(t testing.TB) map[string]bool {
	t.Helper()
	stages := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?mi)^FROM\s+\S+\s+AS\s+(\S+)`).FindAllStringSubmatch(readFile(t, filepath.Join(repoRoot(t), "Dockerfile")), -1) {
		stages[m[1]] = true
	}
	return stages
}

// stage returns the text of the Dockerfile's stage name, up to the next FROM.
func stage(t testing.TB, dockerfile, name string) string {
	t.Helper()
	re := regexp.MustCompile(`(?mi)^FROM\s+\S+\s+AS\s+` + regexp.QuoteMeta(name) + `\s*$`)
	loc := re.FindStringIndex(dockerfile)
	if loc == nil {
		t.Fatalf("Dockerfile has no stage %s", name)
	}
	rest := dockerfile[loc[1]:]
	if next := regexp.MustCompile(`(?m)^FROM\s`).FindStringIndex(rest); next != nil {
		rest = rest[:next[0]]
	}
	return rest
}

// ignored reports whether .dockerignore keeps rel (a slash path relative to
// the repository) out of the build context.
func ignored(patterns []string, rel string) bool {
	for _, p := range patterns {
		if sub, ok := strings.CutPrefix(p, "**/"); ok {
			parts := strings.Split(rel, "/")
			for i := range parts {
				if m, _ := filepath.Match(sub, strings.Join(parts[i:], "/")); m {
					return true
				}
			}
			continue
		}
		if m, _ := filepath.Match(p, rel); m || strings.HasPrefix(rel, p+"/") {
			return true
		}
	}
	return false
}

func dockerignore(t testing.TB) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(readFile(t, filepath.Join(repoRoot(t), ".dockerignore")), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, strings.TrimPrefix(l, "/"))
		}
	}
	return out
}

// The Dockerfile builds, from what the build context holds, the packages
// that exist, static, stamped as the Makefile stamps `pgwarden version`, into
// shell-less images run as a non-root user, with a healthcheck against
// /healthz on pgwarden's default metrics port. (No Docker engine here: the
// image itself is not built.)
func TestDockerfile(t *testing.T) {
	root := repoRoot(t)
	df := readFile(t, filepath.Join(root, "Dockerfile"))
	ign := dockerignore(t)
	stages := dockerStages(t)
	for _, s := range []string{"build", "devissuer", "pgwarden"} {
		if !stages[s] {
			t.Errorf("no stage %s", s)
		}
	}
	froms := regexp.MustCompile(`(?m)^FROM\s+(\S+)\s+AS\s+(\S+)`).FindAllStringSubmatch(df, -1)
	if last := froms[len(froms)-1]; last[2] != "pgwarden" {
		t.Errorf("the last stage, docker build's default, is %s, not pgwarden", last[2])
	}
	// The Go release is of the line go.mod asks for.
	gomod := readFile(t, filepath.Join(root, "go.mod"))
	goLine := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(gomod)
	goArg := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)`).FindStringSubmatch(df)
	if goLine == nil || goArg == nil || !strings.HasPrefix(goArg[1], goLine[1]+".") {
		t.Errorf("Dockerfile's GO_VERSION %v is not of go.mod's go %v", goArg, goLine)
	}

	build := stage(t, df, "build")
	if !strings.Contains(build, "ENV CGO_ENABLED=0") {
		t.Error("the build stage does not build static binaries (CGO_ENABLED=0)")
	}
	// Files copied from the context exist and are not ignored.
	for _, m := range regexp.MustCompile(`(?m)^COPY\s+(.+)$`).FindAllStringSubmatch(df, -1) {
		args := strings.Fields(m[1])
		if strings.HasPrefix(args[0], "--from=") || (len(args) > 1 && strings.HasPrefix(args[1], "--from=")) {
			continue
		}
		for _, src := range args[:len(args)-1] {
			if strings.HasPrefix(src, "--") || src == "." {
				continue
			}
			if _, err := os.Stat(filepath.Join(root, src)); err != nil {
				t.Errorf("COPY %s: %v", src, err)
			}
			if ignored(ign, src) {
				t.Errorf("COPY %s: .dockerignore keeps it out of the context", src)
			}
		}
	}
	// Every package built exists, and nothing it imports from this module is
	// kept out of the context.
	builds := regexp.MustCompile(`go build ([^&\\]*?)-o (\S+) (\./\S+)`).FindAllStringSubmatch(build, -1)
	if len(builds) != 3 {
		t.Fatalf("the build stage builds %d binaries, want pgwarden, healthprobe, devissuer", len(builds))
	}
	var pkgs []string
	for _, b := range builds {
		pkgs = append(pkgs, b[3])
		if b[2] == "/out/pgwarden" {
			if b[3] != "./cmd/pgwarden" || !strings.Contains(b[1], "-X main.buildVersion=${VERSION}") {
				t.Errorf("pgwarden is built as %q: want ./cmd/pgwarden with -X main.buildVersion=${VERSION}", b[0])
			}
		}
	}
	list := exec.Command("go", append([]string{"list", "-deps", "-f", "{{if not .Standard}}{{.Dir}}{{end}}"}, pkgs...)...)
	list.Dir = root
	out, err := list.Output()
	if err != nil {
		t.Fatalf("go list %v: %v", pkgs, err)
	}
	for _, dir := range strings.Fields(string(out)) {
		rel, err := filepath.Rel(root, dir)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue // a module dependency, downloaded in the image
		}
		if ignored(ign, filepath.ToSlash(rel)) {
			t.Errorf("the image builds %s, which .dockerignore keeps out", rel)
		}
	}
	// The version stamp is a variable of cmd/pgwarden, and the Makefile sets it too.
	if !regexp.MustCompile(`(?m)^var buildVersion string`).MatchString(readFile(t, filepath.Join(root, "cmd/pgwarden/main.go"))) {
		t.Error("cmd/pgwarden/main.go has no var buildVersion for -X main.buildVersion")
	}
	mk := exec.Command("make", "-s", "-n", "build", "VERSION=v9.8.7-test")
	mk.Dir = root
	mkOut, err := mk.Output()
	if err != nil {
		t.Fatalf("make -n build: %v", err)
	}
	if !regexp.MustCompile(`(?m)^go build .*-X main\.buildVersion=v9\.8\.7-test.* -o bin/pgwarden \./cmd/pgwarden$`).Match(mkOut) {
		t.Errorf("make build does not stamp the version as the Dockerfile does:\n%s", mkOut)
	}

	// Runtime stages: no shell, a non-root user, the healthcheck.
	for _, s := range []string{"devissuer", "pgwarden"} {
		text := stage(t, df, s)
		from := ""
		for _, f := range froms {
			if f[2] == s {
				from = f[1]
			}
		}
		if !strings.HasPrefix(from, "gcr.io/distroless/static") {
			t.Errorf("stage %s runs on %s, not a shell-less static base", s, from)
		}
		if !regexp.MustCompile(`(?m)^USER 65532:65532$`).MatchString(text) {
			t.Errorf("stage %s does not run as the non-root user", s)
		}
		if !strings.Contains(text, "HEALTHCHECK") {
			t.Errorf("stage %s has no HEALTHCHECK", s)
		}
	}
	pg := stage(t, df, "pgwarden")
	if !strings.Contains(pg, `ENTRYPOINT ["/usr/local/bin/pgwarden"]`) {
		t.Error("the pgwarden image's entrypoint is not pgwarden")
	}
	if !strings.Contains(pg, `CMD ["/usr/local/bin/healthprobe"]`) {
		t.Error("the pgwarden image's healthcheck is not healthprobe's default URL")
	}
	// healthprobe's default URL is /healthz on pgwarden's default metrics listener.
	src := readFile(t, filepath.Join(root, "deploy/cmd/healthprobe/main.go"))
	m := regexp.MustCompile(`const DefaultURL = "([^"]+)"`).FindStringSubmatch(src)
	if m == nil {
		t.Fatal("healthprobe has no DefaultURL")
	}
	u, err := url.Parse(m[1])
	if err != nil {
		t.Fatal(err)
	}
	def := loadConfig(t, "defaults", `{"oidc": {"issuer_url": "https://idp.example", "audiences": ["x"]}, "databases": [{"name": "d", "upstream": "host=127.0.0.1", "levels": [{"name": "l"}]}]}`, nil)
	if u.Path != "/healthz" || u.Host != def.MetricsListen {
		t.Errorf("healthprobe's default %s is not /healthz on the default metrics_listen %s", m[1], def.MetricsListen)
	}
}

// .dockerignore's patterns as this test reads them.
func TestDockerignoreMatching(t *testing.T) {
	ign := []string{".git", "bin", "testenv/vaultbin", "**/*.test"}
	for rel, want := range map[string]bool{
		".git": true, ".git/config": true, "bin/vault": true, "binary": false,
		"testenv/vaultbin/go.mod": true, "testenv": false, "testenv/pki": false,
		"proxy/proxy.test": true, "proxy.test": true, "proxy/proxy.go": false,
	} {
		if got := ignored(ign, rel); got != want {
			t.Errorf("ignored(%s) = %v", rel, got)
		}
	}
}
