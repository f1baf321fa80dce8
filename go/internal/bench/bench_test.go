// Package bench compares calls through the tunnel with direct gRPC calls,
// on the same machine in the same run. `go run mage.go bench` runs it and
// prints the ratios.
package bench

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) {
	log.SetLogger(logr.Discard()) // the server logs through controller-runtime
	os.Exit(m.Run())
}

// service answers as gRPC's interop TestService does.
type service struct {
	testgrpc.UnimplementedTestServiceServer
}

func (service) UnaryCall(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: make([]byte, in.ResponseSize)}}, nil
}

func (service) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	body := make([]byte, in.ResponseParameters[0].Size)
	for range len(in.ResponseParameters) {
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: body}}); err != nil {
			return err
		}
	}
	return nil
}

func socket(b *testing.B) string {
	dir, err := os.MkdirTemp("", "opfb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s.sock")
}

// direct serves the service with a plain gRPC server and returns a client.
func direct(b *testing.B) testgrpc.TestServiceClient {
	path := socket(b)
	lis, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, service{})
	go gs.Serve(lis)
	b.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return testgrpc.NewTestServiceClient(cc)
}

// tunnelled serves the same service as a plugin and returns a client that
// calls it through the operator's registry.
func tunnelled(b *testing.B) testgrpc.TestServiceClient {
	path := socket(b)
	srv, err := server.New("unix://" + path)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Start(ctx)
	}()
	b.Cleanup(func() { cancel(); <-done })
	if _, err := srv.Addr(ctx); err != nil {
		b.Fatal(err)
	}
	c, err := client.New(ctx, "bench", "unix://"+path, "v1", &testgrpc.TestService_ServiceDesc, service{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	p, err := srv.GetRegistry().Wait(wctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	return testgrpc.NewTestServiceClient(p)
}

var paths = []struct {
	name string
	dial func(*testing.B) testgrpc.TestServiceClient
}{
	{"direct", direct},
	{"tunnel", tunnelled},
}

// BenchmarkUnary64B reports the median latency of sequential 64-byte calls.
func BenchmarkUnary64B(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			c := p.dial(b)
			req := &testgrpc.SimpleRequest{ResponseSize: 64, Payload: &testgrpc.Payload{Body: make([]byte, 64)}}
			ctx := context.Background()
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if _, err := c.UnaryCall(ctx, req); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
		})
	}
}

// BenchmarkUnary64BConcurrent16 reports the throughput of 16 callers making
// 64-byte calls at once.
func BenchmarkUnary64BConcurrent16(b *testing.B) {
	const callers = 16
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			c := p.dial(b)
			req := &testgrpc.SimpleRequest{ResponseSize: 64, Payload: &testgrpc.Payload{Body: make([]byte, 64)}}
			ctx := context.Background()
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for w := range callers {
				wg.Go(func() {
					for i := w; i < b.N; i += callers {
						if _, err := c.UnaryCall(ctx, req); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "calls/s")
		})
	}
}

// BenchmarkStream1MiB reports the throughput of a server stream of 1 MiB
// messages.
func BenchmarkStream1MiB(b *testing.B) {
	const size = 1 << 20
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			c := p.dial(b)
			params := make([]*testgrpc.ResponseParameters, b.N)
			for i := range params {
				params[i] = &testgrpc.ResponseParameters{Size: size}
			}
			b.SetBytes(size)
			b.ResetTimer()
			stream, err := c.StreamingOutputCall(context.Background(), &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
			if err != nil {
				b.Fatal(err)
			}
			for range b.N {
				if _, err := stream.Recv(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
