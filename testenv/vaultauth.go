package testenv

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	vault "github.com/hashicorp/vault/api"
)

// This file sets up the auth methods pgwarden's own Vault identity can use
// besides a token (broker.Self): AppRole, and Kubernetes against KubeAPI, a
// stand-in for the one Kubernetes API call Vault makes.

// AppRole is an AppRole auth role for pgwarden's own identity.
type AppRole struct {
	// Mount is the auth method's path. Default "approle".
	Mount string
	// Name is the role's name. Default "pgwarden".
	Name string
	// Policies are the token's policies (token_policies).
	Policies []string
	// NoDefaultPolicy leaves Vault's "default" policy off the token, so
	// Policies alone must let it look up, renew and revoke itself.
	NoDefaultPolicy bool
	// TokenTTL and TokenMaxTTL bound the tokens a login returns (whole
	// seconds). Zero: Vault's defaults.
	TokenTTL, TokenMaxTTL time.Duration
}

// EnableAppRole enables AppRole auth at r.Mount unless it is enabled already,
// writes the role, and returns its role_id and a new secret_id. root must be
// allowed to do all that (the dev server's root token).
func EnableAppRole(ctx context.Context, root *vault.Client, r AppRole) (roleID, secretID string, err error) {
	if r.Mount == "" {
		r.Mount = "approle"
	}
	if r.Name == "" {
		r.Name = "pgwarden"
	}
	if err := enableAuth(ctx, root, r.Mount, "approle"); err != nil {
		return "", "", err
	}
	role := "auth/" + r.Mount + "/role/" + r.Name
	if _, err := root.Logical().WriteWithContext(ctx, role, tokenFields(r.Policies, r.NoDefaultPolicy, r.TokenTTL, r.TokenMaxTTL)); err != nil {
		return "", "", fmt.Errorf("testenv: write AppRole %s: %w", r.Name, err)
	}
	sec, err := root.Logical().ReadWithContext(ctx, role+"/role-id")
	if err != nil {
		return "", "", fmt.Errorf("testenv: read AppRole %s role_id: %w", r.Name, err)
	}
	if sec == nil || sec.Data["role_id"] == nil {
		return "", "", fmt.Errorf("testenv: AppRole %s has no role_id", r.Name)
	}
	roleID, _ = sec.Data["role_id"].(string)
	sec, err = root.Logical().WriteWithContext(ctx, role+"/secret-id", nil)
	if err != nil {
		return "", "", fmt.Errorf("testenv: AppRole %s secret_id: %w", r.Name, err)
	}
	if sec == nil || sec.Data["secret_id"] == nil {
		return "", "", fmt.Errorf("testenv: AppRole %s returned no secret_id", r.Name)
	}
	secretID, _ = sec.Data["secret_id"].(string)
	return roleID, secretID, nil
}

// KubeAPIAudience is the audience of tokens meant for KubeAPI itself (the
// API server's default audience), such as Vault's token reviewer JWT.
const KubeAPIAudience = "https://kubernetes.default.svc"

// KubeAPI stands in for a Kubernetes API server as far as Vault's kubernetes
// auth method uses one: POST /apis/authentication.k8s.io/v1/tokenreviews.
// Vault asks it at every login, even when it verified the token's signature
// itself with pem_keys (vault-plugin-auth-kubernetes v0.21.0, path_login.go:
// pathLogin calls serviceAccount.lookup, token_review.go Review, without
// condition). It is an httptest server on 127.0.0.1.
//
// Its service accounts are tokens signed by Issuer, with the claims a
// Kubernetes API server projects into a pod (ServiceAccountToken). A review
// authenticates a token whose signature, issuer, expiry and audience are
// valid and whose service account exists with the token's uid, as the API
// server does; deleting or recreating an account invalidates its tokens.
// The request's bearer must be such a token for KubeAPIAudience.
type KubeAPI struct {
	URL    string // http://127.0.0.1:port
	Issuer *Issuer

	srv     *httptest.Server
	reviews atomic.Int32

	mu       sync.Mutex
	accounts map[string]string // "namespace/name" → uid; guarded by mu
}

// StartKubeAPI starts a KubeAPI whose tokens is signs. Close stops it.
func StartKubeAPI(is *Issuer) *KubeAPI {
	k := &KubeAPI{Issuer: is, accounts: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /apis/authentication.k8s.io/v1/tokenreviews", k.serveTokenReview)
	k.srv = httptest.NewServer(mux)
	k.URL = k.srv.URL
	return k
}

// Close stops the server.
func (k *KubeAPI) Close() { k.srv.Close() }

// Reviews is how many TokenReviews have been asked for.
func (k *KubeAPI) Reviews() int { return int(k.reviews.Load()) }

// CreateServiceAccount creates (or recreates, with a new uid) a service
// account and returns its uid.
func (k *KubeAPI) CreateServiceAccount(namespace, name string) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	h := hex.EncodeToString(b)
	uid := h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	k.mu.Lock()
	k.accounts[namespace+"/"+name] = uid
	k.mu.Unlock()
	return uid
}

// DeleteServiceAccount deletes a service account: reviews of its tokens fail
// from now on.
func (k *KubeAPI) DeleteServiceAccount(namespace, name string) {
	k.mu.Lock()
	delete(k.accounts, namespace+"/"+name)
	k.mu.Unlock()
}

// ServiceAccountToken mints a token for the service account (created when
// absent) with the claims Kubernetes projects into a pod for audience, valid
// for ttl: iss, sub "system:serviceaccount:<namespace>:<name>", aud, iat,
// nbf, exp, and the "kubernetes.io" block with namespace, pod and service
// account. It is signed RS256 by Issuer.
func (k *KubeAPI) ServiceAccountToken(namespace, name, audience string, ttl time.Duration) (string, error) {
	k.mu.Lock()
	uid, ok := k.accounts[namespace+"/"+name]
	k.mu.Unlock()
	if !ok {
		uid = k.CreateServiceAccount(namespace, name)
	}
	now := time.Now()
	claims := jwt.MapClaims{
		"iss": k.Issuer.URL, "sub": "system:serviceaccount:" + namespace + ":" + name,
		"aud": []string{audience},
		"iat": now.Add(-time.Second).Unix(), "nbf": now.Add(-time.Second).Unix(), "exp": now.Add(ttl).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      namespace,
			"pod":            map[string]any{"name": name + "-0", "uid": "pod-" + uid},
			"serviceaccount": map[string]any{"name": name, "uid": uid},
		},
	}
	k.Issuer.mu.Lock()
	var key *signingKey
	for i := range k.Issuer.keys {
		if k.Issuer.keys[i].alg == "RS256" {
			key = &k.Issuer.keys[i]
			break
		}
	}
	k.Issuer.mu.Unlock()
	if key == nil {
		return "", errors.New("testenv: issuer has no RS256 key")
	}
	t := jwt.NewWithClaims(key.method, claims)
	t.Header["kid"] = key.kid
	return t.SignedString(key.priv)
}

// tokenReview is the part of authentication.k8s.io/v1 TokenReview that Vault
// sends and reads.
type tokenReview struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Spec       struct {
		Token     string   `json:"token"`
		Audiences []string `json:"audiences,omitempty"`
	} `json:"spec"`
	Status tokenReviewStatus `json:"status"`
}

type tokenReviewStatus struct {
	Authenticated bool `json:"authenticated"`
	User          struct {
		Username string   `json:"username,omitempty"`
		UID      string   `json:"uid,omitempty"`
		Groups   []string `json:"groups,omitempty"`
	} `json:"user"`
	Audiences []string `json:"audiences,omitempty"`
	Error     string   `json:"error,omitempty"`
}

func (k *KubeAPI) serveTokenReview(w http.ResponseWriter, r *http.Request) {
	k.reviews.Add(1)
	w.Header().Set("Content-Type", "application/json")
	bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if _, _, _, err := k.authenticate(bearer, []string{KubeAPIAudience}); !ok || err != nil {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}`))
		return
	}
	var tr tokenReview
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&tr); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		_, _ = fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":%q,"reason":"BadRequest","code":400}`, err.Error())
		return
	}
	want := tr.Spec.Audiences
	if len(want) == 0 {
		want = []string{KubeAPIAudience}
	}
	tr.Status = tokenReviewStatus{}
	if user, uid, auds, err := k.authenticate(tr.Spec.Token, want); err != nil {
		tr.Status.Error = err.Error()
	} else {
		tr.Status.Authenticated = true
		tr.Status.User.Username, tr.Status.User.UID, tr.Status.Audiences = user, uid, auds
		ns := strings.Split(user, ":")[2]
		tr.Status.User.Groups = []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}
	}
	tr.APIVersion, tr.Kind = "authentication.k8s.io/v1", "TokenReview"
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(tr)
}

// authenticate verifies a service account token as the API server does and
// returns its user name, uid, and the audiences of want it is valid for.
func (k *KubeAPI) authenticate(token string, want []string) (user, uid string, auds []string, err error) {
	var claims struct {
		jwt.RegisteredClaims
		Kubernetes struct {
			Namespace      string `json:"namespace"`
			ServiceAccount struct {
				Name string `json:"name"`
				UID  string `json:"uid"`
			} `json:"serviceaccount"`
		} `json:"kubernetes.io"`
	}
	_, err = jwt.ParseWithClaims(token, &claims, k.Issuer.verificationKey,
		jwt.WithValidMethods([]string{"RS256", "ES256"}), jwt.WithIssuer(k.Issuer.URL), jwt.WithExpirationRequired())
	if err != nil {
		return "", "", nil, fmt.Errorf("invalid bearer token: %w", err)
	}
	for _, a := range claims.Audience {
		if slices.Contains(want, a) {
			auds = append(auds, a)
		}
	}
	if len(auds) == 0 {
		return "", "", nil, errors.New("invalid bearer token, token audiences are invalid for the target audiences")
	}
	sa := claims.Kubernetes.ServiceAccount
	ns := claims.Kubernetes.Namespace
	k.mu.Lock()
	live := k.accounts[ns+"/"+sa.Name]
	k.mu.Unlock()
	if sa.Name == "" || live == "" || live != sa.UID {
		return "", "", nil, errors.New("invalid bearer token, service account token has been invalidated")
	}
	return "system:serviceaccount:" + ns + ":" + sa.Name, sa.UID, auds, nil
}

// verificationKey is a jwt.Keyfunc: the public key of the issuer's key the
// token's kid names.
func (is *Issuer) verificationKey(t *jwt.Token) (any, error) {
	kid, _ := t.Header["kid"].(string)
	is.mu.Lock()
	defer is.mu.Unlock()
	for _, k := range is.keys {
		if k.kid == kid {
			return k.priv.Public(), nil
		}
	}
	return nil, fmt.Errorf("unknown kid %q", kid)
}

// PublicKeysPEM returns the issuer's public keys, PKIX PEM-encoded, newest
// first: what Vault's kubernetes auth method takes as pem_keys.
func (is *Issuer) PublicKeysPEM() ([]string, error) {
	is.mu.Lock()
	defer is.mu.Unlock()
	var out []string
	for _, k := range is.keys {
		der, err := x509.MarshalPKIXPublicKey(k.priv.Public())
		if err != nil {
			return nil, err
		}
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	}
	return out, nil
}

// EnableKubernetes enables Vault's kubernetes auth method at mount (default
// "kubernetes") unless it is enabled already, and configures it against api:
// kubernetes_host its URL, pem_keys the issuer's keys, the issuer's URL as
// the required iss, disable_local_ca_jwt (Vault runs outside a pod), and as
// token_reviewer_jwt a token of service account kube-system/vault-auth for
// the API's audience, since a pod's token for Vault's audience would not
// authenticate to the API server.
func EnableKubernetes(ctx context.Context, root *vault.Client, mount string, api *KubeAPI) error {
	if mount == "" {
		mount = "kubernetes"
	}
	if err := enableAuth(ctx, root, mount, "kubernetes"); err != nil {
		return err
	}
	keys, err := api.Issuer.PublicKeysPEM()
	if err != nil {
		return err
	}
	reviewer, err := api.ServiceAccountToken("kube-system", "vault-auth", KubeAPIAudience, 24*time.Hour)
	if err != nil {
		return err
	}
	_, err = root.Logical().WriteWithContext(ctx, "auth/"+mount+"/config", map[string]any{
		"kubernetes_host":        api.URL,
		"pem_keys":               keys,
		"issuer":                 api.Issuer.URL,
		"disable_iss_validation": false,
		"disable_local_ca_jwt":   true,
		"token_reviewer_jwt":     reviewer,
	})
	if err != nil {
		return fmt.Errorf("testenv: configure kubernetes auth: %w", err)
	}
	return nil
}

// KubernetesRole is a kubernetes auth role bound to one service account.
type KubernetesRole struct {
	// Mount is the auth method's path. Default "kubernetes".
	Mount string
	// Name is the role's name. Default "pgwarden".
	Name string
	// ServiceAccount and Namespace are the one service account that may log
	// in (bound_service_account_names, _namespaces).
	ServiceAccount, Namespace string
	// Audience is the aud its tokens must have; empty: any.
	Audience string
	// Policies, NoDefaultPolicy, TokenTTL and TokenMaxTTL as in AppRole.
	Policies              []string
	NoDefaultPolicy       bool
	TokenTTL, TokenMaxTTL time.Duration
}

// WriteKubernetesRole writes the role.
func WriteKubernetesRole(ctx context.Context, root *vault.Client, r KubernetesRole) error {
	if r.Mount == "" {
		r.Mount = "kubernetes"
	}
	if r.Name == "" {
		r.Name = "pgwarden"
	}
	body := tokenFields(r.Policies, r.NoDefaultPolicy, r.TokenTTL, r.TokenMaxTTL)
	body["bound_service_account_names"] = []string{r.ServiceAccount}
	body["bound_service_account_namespaces"] = []string{r.Namespace}
	if r.Audience != "" {
		body["audience"] = r.Audience
	}
	if _, err := root.Logical().WriteWithContext(ctx, "auth/"+r.Mount+"/role/"+r.Name, body); err != nil {
		return fmt.Errorf("testenv: write kubernetes role %s: %w", r.Name, err)
	}
	return nil
}

// tokenFields are the token_* fields every auth role takes.
func tokenFields(policies []string, noDefault bool, ttl, maxTTL time.Duration) map[string]any {
	body := map[string]any{"token_policies": policies, "token_no_default_policy": noDefault}
	if ttl > 0 {
		body["token_ttl"] = int(ttl.Seconds())
	}
	if maxTTL > 0 {
		body["token_max_ttl"] = int(maxTTL.Seconds())
	}
	return body
}

// enableAuth enables the auth method typ at mount unless a method of that
// type is there already.
func enableAuth(ctx context.Context, root *vault.Client, mount, typ string) error {
	auths, err := root.Sys().ListAuthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("testenv: list auth methods: %w", err)
	}
	if a, ok := auths[mount+"/"]; ok {
		if a.Type != typ {
			return fmt.Errorf("testenv: auth/%s is a %s method, not %s", mount, a.Type, typ)
		}
		return nil
	}
	if err := root.Sys().EnableAuthWithOptionsWithContext(ctx, mount, &vault.EnableAuthOptions{Type: typ}); err != nil {
		return fmt.Errorf("testenv: enable %s auth at %s: %w", typ, mount, err)
	}
	return nil
}
