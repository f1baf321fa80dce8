package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/target"
)

// ServiceAccountTokenPath is where Kubernetes mounts a pod's ServiceAccount
// token.
const ServiceAccountTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// securityConfig holds what the options of this file set; apply turns it
// into the connection's credentials.
type securityConfig struct {
	token          func() (string, error) // nil: no token
	plaintextToken bool
	tls            *reloadingTLS // nil: WithTLS not used
}

// WithServiceAccountToken authenticates the plugin with the pod's
// ServiceAccount token, read from ServiceAccountTokenPath at every
// (re)connection. The token must be issued for an audience the operator
// accepts: the default token of a pod is issued for the API server, so
// mount a projected token with the operator's audience there, or elsewhere
// and use WithTokenFile (docs/security.md shows both).
func WithServiceAccountToken() Option {
	return WithTokenFile(ServiceAccountTokenPath)
}

// WithTokenFile authenticates the plugin with the bearer token in the file
// at path (surrounding white space ignored). The file is read again at
// every (re)connection, so a token the kubelet rotated is used from the
// next tunnel on; the operator drains a tunnel before its token expires.
// The token travels as "authorization: Bearer TOKEN" on the tunnel's
// stream, and only over TLS unless WithPlaintextToken allows otherwise.
func WithTokenFile(path string) Option {
	return optionFunc(func(c *config) {
		c.security.token = func() (string, error) {
			b, err := os.ReadFile(path)
			if err != nil {
				return "", fmt.Errorf("read token: %w", err)
			}
			t := strings.TrimSpace(string(b))
			if t == "" {
				return "", fmt.Errorf("read token: %s is empty", path)
			}
			return t, nil
		}
	})
}

// WithStaticToken authenticates the plugin with a fixed bearer token, for
// tests and tools. Like WithTokenFile it is sent only over TLS unless
// WithPlaintextToken allows otherwise.
func WithStaticToken(token string) Option {
	return optionFunc(func(c *config) {
		c.security.token = func() (string, error) {
			if token == "" {
				return "", errors.New("empty static token")
			}
			return token, nil
		}
	})
}

// WithPlaintextToken allows a token (WithTokenFile, WithServiceAccountToken,
// WithStaticToken) to be sent without TLS, and only to a unix socket or a
// loopback address ("localhost", 127.0.0.0/8, ::1): New fails for any other
// target. Anyone who can watch the plaintext connection can replay the
// token, so use it only where nobody else can. Default: a token needs TLS.
func WithPlaintextToken() Option {
	return optionFunc(func(c *config) { c.security.plaintextToken = true })
}

// WithTLS connects to the operator over TLS. caFile is a PEM bundle of the
// certificate authorities to trust, read again at every (re)connection, so
// a CA rotated in place (a ConfigMap or Secret volume) is trusted from the
// next tunnel on; empty trusts the system's roots. serverName is the name
// the operator's certificate must carry; empty takes the host of the
// target. New fails if caFile cannot be loaded. It replaces
// WithTransportCredentials; use one or the other.
func WithTLS(caFile, serverName string) Option {
	return optionFunc(func(c *config) {
		c.security.tls = &reloadingTLS{caFile: caFile, serverName: serverName}
	})
}

// apply sets c's transport and per-RPC credentials from the options above.
func (s securityConfig) apply(c *config, tg target.Target) error {
	if s.tls != nil {
		if c.transportCreds != nil {
			return errors.New("WithTLS and WithTransportCredentials cannot be used together")
		}
		if _, err := s.tls.roots(); err != nil {
			return err
		}
		c.transportCreds = s.tls
	}
	if s.token == nil {
		return nil
	}
	if c.perRPCCreds != nil {
		return errors.New("a token option and WithPerRPCCredentials cannot be used together")
	}
	secure := c.transportCreds != nil && c.transportCreds.Info().SecurityProtocol != "insecure"
	local := s.plaintextToken && tg.Local()
	switch {
	case secure || local:
	case s.plaintextToken:
		return fmt.Errorf("refusing to send a token over plaintext to %q: WithPlaintextToken allows only a unix socket or a loopback address", tg)
	default:
		return errors.New("refusing to send a token without TLS: use WithTLS or WithTransportCredentials, or WithPlaintextToken for a unix socket or loopback target")
	}
	c.perRPCCreds = &tokenCredentials{source: s.token, requireSecurity: !local}
	return nil
}

// tokenCredentials attaches the bearer token to each tunnel's stream.
type tokenCredentials struct {
	source          func() (string, error)
	requireSecurity bool
}

func (t *tokenCredentials) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if t.requireSecurity {
		ri, _ := credentials.RequestInfoFromContext(ctx)
		if err := credentials.CheckSecurityLevel(ri.AuthInfo, credentials.PrivacyAndIntegrity); err != nil {
			return nil, status.Errorf(codes.Unauthenticated, "refusing to send the token on this connection: %v", err)
		}
	}
	token, err := t.source()
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

func (t *tokenCredentials) RequireTransportSecurity() bool { return t.requireSecurity }

// reloadingTLS is TLS whose trusted CAs come from a file read again at each
// handshake (one per tunnel), and used again while unchanged.
type reloadingTLS struct {
	caFile, serverName string

	mu    sync.Mutex
	caPEM []byte
	pool  *x509.CertPool
}

var _ credentials.TransportCredentials = (*reloadingTLS)(nil)

// roots returns the CAs to trust, nil for the system's.
func (r *reloadingTLS) roots() (*x509.CertPool, error) {
	if r.caFile == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(r.caFile)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pool != nil && bytes.Equal(pem, r.caPEM) {
		return r.pool, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", r.caFile)
	}
	r.caPEM, r.pool = pem, pool
	return pool, nil
}

func (r *reloadingTLS) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	pool, err := r.roots()
	if err != nil {
		return nil, nil, err
	}
	if r.serverName != "" {
		// gRPC's TLS takes the name to verify from the authority.
		authority = r.serverName
	}
	return credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}).ClientHandshake(ctx, authority, conn)
}

func (r *reloadingTLS) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("plugin client: TLS credentials are client-side only")
}

func (r *reloadingTLS) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (r *reloadingTLS) Clone() credentials.TransportCredentials {
	return &reloadingTLS{caFile: r.caFile, serverName: r.serverName}
}

// OverrideServerName is deprecated in gRPC; it sets the expected name.
func (r *reloadingTLS) OverrideServerName(name string) error {
	r.serverName = name
	return nil
}
