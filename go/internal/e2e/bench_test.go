package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/bench"
)

// BenchmarkDeployments runs go/internal/bench's benchmarks in the two
// deployments that need Kubernetes, against a real API server and the
// real kube-rbac-proxy (`go run mage.go bench` prints the ratios):
//
//   - "tls": the built-in mode, TLS on loopback TCP, the plugin's
//     ServiceAccount token reviewed by the API server (TokenReview) and its
//     registration authorized (SubjectAccessReview); the control is a bare
//     stream to a gRPC server with a certificate from the same kind of CA
//     on loopback TCP, the token sent along.
//   - "proxy": the server behind kube-rbac-proxy with
//     config/kube-rbac-proxy's arguments; the control is a bare stream on
//     the Connect path through a second kube-rbac-proxy with the same
//     arguments, the same RBAC and the same token.
//
// Both modes also measure "call": a new gRPC call on the bare server for
// each unary round trip (bench.BareCalls), what a plain unary call costs
// on the same route, against which the bare stream's single message is
// the floor.
//
// Without the Kubernetes binaries it is skipped.
func BenchmarkDeployments(b *testing.B) {
	log.SetLogger(logr.Discard()) // the server logs through controller-runtime
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		// go test prints no skip message for a benchmark, even with -v.
		fmt.Println("BenchmarkDeployments: skipped: KUBEBUILDER_ASSETS is not set; `go run mage.go bench` builds the Kubernetes binaries and sets it")
	}
	c := startCluster(b)
	token, _ := c.token(b, pluginNS, pluginSA, c.audience)

	builtIn := startBuiltIn(b, c)
	tls := newPKI(b, "bench-ca")
	tlsCreds, err := credentials.NewServerTLSFromFile(tls.certFile, tls.keyFile)
	if err != nil {
		b.Fatal(err)
	}
	bare := bench.Bare{CC: dialBench(b, bareServer(b, grpc.Creds(tlsCreds)), tls.caFile, token)}
	bench.Run(b, bench.Mode{Name: "tls", Paths: []bench.NamedPath{
		{Name: "bare", Path: bare},
		{Name: "call", Path: bench.BareCalls{Bare: bare}, UnaryOnly: true},
		{Name: "tunnel", Path: bench.Calls{C: benchPlugin(b, builtIn, token)}},
	}})

	behind := startBehindProxy(b, c)
	listen, caFile, pid := c.proxyFor(b, bareServer(b), proxyUID(b))
	bare = bench.Bare{CC: dialBench(b, listen, caFile, token)}
	bench.Run(b, bench.Mode{Name: "proxy", Paths: []bench.NamedPath{
		{Name: "bare", Path: bare, ProxyPID: pid},
		{Name: "call", Path: bench.BareCalls{Bare: bare}, ProxyPID: pid, UnaryOnly: true},
		{Name: "tunnel", Path: bench.Calls{C: benchPlugin(b, behind, token)}, ProxyPID: behind.proxyPID},
	}})
}

// bareServer serves the bare stream (bench.RegisterBare) on loopback TCP
// until the benchmark ends and returns its address.
func bareServer(b *testing.B, opts ...grpc.ServerOption) string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer(opts...)
	bench.RegisterBare(gs)
	go gs.Serve(lis)
	b.Cleanup(gs.Stop)
	return lis.Addr().String()
}

// dialBench connects to target over TLS, trusting caFile, with token on
// every call.
func dialBench(b *testing.B, target, caFile, token string) *grpc.ClientConn {
	creds, err := credentials.NewClientTLSFromFile(caFile, serverName)
	if err != nil {
		b.Fatal(err)
	}
	cc, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds), grpc.WithPerRPCCredentials(bearer(token)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return cc
}

// bearer sends a token as a bearer token.
type bearer string

func (t bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// benchPlugin connects a plugin serving bench.Service to ep with token
// and returns a client calling it through the operator's registry.
func benchPlugin(b *testing.B, ep *endpoint, token string) testgrpc.TestServiceClient {
	p, err := client.New(context.Background(), pluginName, ep.target, "v1.0.0", &testgrpc.TestService_ServiceDesc, bench.Service{},
		client.WithStaticToken(token),
		client.WithTLS(ep.caFile, ep.serverName),
		client.WithBackoff(fastBackoff))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	ctx, cancel := context.WithTimeout(b.Context(), 20*time.Second)
	defer cancel()
	conn, err := ep.srv.GetRegistry().Wait(ctx, pluginName)
	if err != nil {
		b.Fatalf("the plugin never registered: %v\nserver log:\n%s", err, ep.logs.String())
	}
	return testgrpc.NewTestServiceClient(conn)
}
