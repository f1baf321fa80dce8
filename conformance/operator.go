package conformance

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// realOperator runs the framework's Go server on the case's socket (or one
// replica's address), and can restart it there.
type realOperator struct {
	spec   OperatorSpec
	addr   string                       // names the server: unix:///path or tcp://host:port
	listen func() (net.Listener, error) // the socket, again on each start
	tls    *tlsMaterial                 // nil: plaintext
	logger logr.Logger
	// replicaID is WithReplica's id, with a generation number added on
	// each restart: a restarted replica is a new process (empty: the
	// case's, or the server's default).
	replicaID    string
	replicaCount int
	generation   int

	rejected      atomic.Int64
	registrations atomic.Int64 // Register frames the policy saw
	accepted      atomic.Int64 // connections accepted, over every start

	mu     sync.Mutex
	srv    *server.Server
	reg    *registry.Registry
	lis    *trackingListener
	cancel context.CancelFunc
	errc   chan error
}

func newRealOperator(spec OperatorSpec, path string, tls *tlsMaterial, logf func(string, ...any)) *realOperator {
	logger := funcr.New(func(prefix, args string) { logf("server: %s %s", prefix, args) }, funcr.Options{Verbosity: 1})
	return &realOperator{spec: spec, addr: "unix://" + path, listen: func() (net.Listener, error) { return listenUnix(path) },
		tls: tls, logger: logger, replicaID: spec.ReplicaID, replicaCount: spec.ReplicaCount}
}

// newReplicaOperator is replica i of a case with several servers, on its
// loopback address.
func newReplicaOperator(spec OperatorSpec, i int, rs *replicaSet, logf func(string, ...any)) *realOperator {
	logger := funcr.New(func(prefix, args string) { logf("server %d: %s %s", i, prefix, args) }, funcr.Options{Verbosity: 1})
	return &realOperator{spec: spec, addr: "tcp://" + rs.addrs[i], listen: func() (net.Listener, error) { return rs.listener(i) },
		logger: logger, replicaID: fmt.Sprintf("replica-%d", i), replicaCount: spec.ReplicaCount}
}

func (o *realOperator) options() []server.Option {
	s := o.spec
	// The cases' operators listen on loopback, without credentials unless
	// the case gives a token; and with the protocol's default batch limit,
	// which the raw plugin's batches assume.
	opts := []server.Option{server.WithInsecureNoAuthentication(), server.WithMaxBatchSize(4 << 20)}
	if s.MaxMessageSize > 0 {
		opts = append(opts, server.WithMaxMessageSize(int(s.MaxMessageSize)))
	}
	if s.InitialWindowSize > 0 {
		opts = append(opts, server.WithInitialWindowSize(int(s.InitialWindowSize)))
	}
	if s.HeartbeatInterval > 0 {
		opts = append(opts, server.WithHeartbeatInterval(time.Duration(s.HeartbeatInterval)))
	}
	opts = append(opts, server.WithDrainTimeout(s.DrainTimeout.D(5*time.Second)))
	if s.HandshakeTimeout > 0 {
		opts = append(opts, server.WithHandshakeTimeout(time.Duration(s.HandshakeTimeout)))
	}
	// The policy counts registrations, and refuses them as the case asks.
	opts = append(opts, server.WithRegistrationPolicy(func(context.Context, server.Identity, server.Registration) error {
		o.registrations.Add(1)
		r := s.Reject
		if r == nil {
			return nil
		}
		code, _ := codeByName(r.Code)
		if code == codes.OK {
			code = codes.PermissionDenied
		}
		msg := r.Message
		if r.MessageSize > 0 {
			msg = letters(int(r.MessageSize))
		}
		if r.Count == 0 || o.rejected.Load() < int64(r.Count) {
			o.rejected.Add(1)
			return status.Error(code, msg)
		}
		return nil
	}))
	if token := s.Token; token != "" {
		opts = append(opts, server.WithAuthenticator(func(ctx context.Context) (server.Identity, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+token {
				return server.Identity{}, status.Errorf(codes.Unauthenticated, "want the conformance token, got authorization %q", got)
			}
			return server.Identity{User: "conformance-token"}, nil
		}))
	}
	if o.tls != nil {
		opts = append(opts, server.WithTLS(o.tls.certFile, o.tls.keyFile))
	}
	if id := o.replicaID; id != "" || o.replicaCount > 0 {
		if id != "" && o.generation > 0 {
			id = fmt.Sprintf("%s-gen%d", id, o.generation)
		}
		opts = append(opts, server.WithReplica(id, o.replicaCount))
	}
	return opts
}

// start starts a new server on the socket; from the second start on, it is
// a new process with a new replica id.
func (o *realOperator) start() error {
	lis, err := o.listen()
	if err != nil {
		return err
	}
	defer func() { o.generation++ }()
	tl := &trackingListener{Listener: lis, accepted: &o.accepted}
	srv, err := server.New(o.addr, append(o.options(), server.WithListener(tl))...)
	if err != nil {
		lis.Close()
		return err
	}
	ctx, cancel := context.WithCancel(logr.NewContext(context.Background(), o.logger))
	errc := make(chan error, 1)
	go func() { errc <- srv.Start(ctx) }()
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	if _, err := srv.Addr(actx); err != nil {
		cancel()
		return fmt.Errorf("server did not start: %w", err)
	}
	o.mu.Lock()
	o.srv, o.reg, o.lis, o.cancel, o.errc = srv, srv.GetRegistry(), tl, cancel, errc
	o.mu.Unlock()
	return nil
}

// registry is the running server's registry.
func (o *realOperator) registry() *registry.Registry {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.reg
}

// stop stops the server: a graceful stop drains it, a crash cuts every
// connection first.
func (o *realOperator) stop(crash bool) error {
	o.mu.Lock()
	cancel, errc, lis := o.cancel, o.errc, o.lis
	o.cancel = nil
	o.mu.Unlock()
	if cancel == nil {
		return nil
	}
	if crash {
		lis.cut()
	}
	cancel()
	select {
	case err := <-errc:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("the server did not stop within 30s")
	}
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return net.Listen("unix", path)
}

// trackingListener remembers its connections so that a crash can cut them.
type trackingListener struct {
	net.Listener
	accepted *atomic.Int64
	mu       sync.Mutex
	conns    []net.Conn
	dead     bool
}

func (l *trackingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		dead := l.dead
		if !dead {
			l.conns = append(l.conns, c)
			if l.accepted != nil {
				l.accepted.Add(1)
			}
		}
		l.mu.Unlock()
		if !dead {
			return c, nil
		}
		c.Close() // a dead process accepts nothing
	}
}

// cut closes every connection, as if the process died, and every one that
// comes later.
func (l *trackingListener) cut() {
	l.mu.Lock()
	l.dead = true
	conns := l.conns
	l.conns = nil
	l.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// tlsMaterial is a throw-away CA and a server certificate it signed, in
// PEM files.
type tlsMaterial struct {
	caFile, certFile, keyFile string
	serverName                string
	pool                      *x509.CertPool
}

const tlsServerName = "operator.conformance.test"

func newTLSMaterial(dir string) (*tlsMaterial, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "conformance CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: tlsServerName},
		DNSNames:     []string{tlsServerName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	m := &tlsMaterial{
		caFile:     filepath.Join(dir, "ca.pem"),
		certFile:   filepath.Join(dir, "server.pem"),
		keyFile:    filepath.Join(dir, "server-key.pem"),
		serverName: tlsServerName,
		pool:       x509.NewCertPool(),
	}
	m.pool.AddCert(ca)
	for file, block := range map[string]*pem.Block{
		m.caFile:   {Type: "CERTIFICATE", Bytes: caDER},
		m.certFile: {Type: "CERTIFICATE", Bytes: der},
		m.keyFile:  {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *tlsMaterial) clientCreds() credentials.TransportCredentials {
	return credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: m.pool, ServerName: m.serverName})
}
