// Package bench measures calls through the tunnel beside a control over
// the same path (direct gRPC calls, or a bare gRPC stream), in the same
// run. Its own benchmarks (bench_test.go) cover the plaintext unix socket;
// go/internal/e2e runs the same benchmarks over TLS with the built-in
// authentication and behind the real kube-rbac-proxy. `go run mage.go
// bench` runs both and prints the ratios (./report).
//
// Benchmark names are Benchmark<Package>/<mode>/<benchmark>/<path>, where
// path is "tunnel" or a control: "direct" (the TestService called with
// plain gRPC) or "bare" (a bare bidi stream on the Connect method's path,
// so that it takes exactly the route a tunnel takes, through the same
// proxy rules).
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Sizes of the benchmarks' messages.
const (
	UnarySize  = 64
	StreamSize = 1 << 20
	Callers    = 16
)

// zeros backs every payload: the service must cost the same on every
// path and as little as possible, so it neither fills nor allocates
// bodies (proto marshalling only reads them).
var zeros = make([]byte, 4<<20)

func body(n int32) *testgrpc.Payload { return &testgrpc.Payload{Body: zeros[:n]} }

// Service is gRPC's interop TestService, reduced to what the benchmarks
// call.
type Service struct {
	testgrpc.UnimplementedTestServiceServer
}

func (Service) UnaryCall(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Payload: body(in.ResponseSize)}, nil
}

func (Service) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	for _, p := range in.ResponseParameters {
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: body(p.Size)}); err != nil {
			return err
		}
	}
	return nil
}

func (Service) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	var total int32
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		total += int32(len(in.GetPayload().GetBody()))
	}
}

// FullDuplexCall answers each request with the responses it asks for.
func (Service) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, p := range in.ResponseParameters {
			if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: body(p.Size)}); err != nil {
				return err
			}
		}
	}
}

// BarePath is where the bare control stream is served: the Connect
// method's path, which a kube-rbac-proxy configured for the framework
// lets through.
const BarePath = pb.PluginFrameworkService_Connect_FullMethodName

var bareDesc = grpc.StreamDesc{StreamName: "Connect", ServerStreams: true, ClientStreams: true}

// RegisterBare serves Service's FullDuplexCall at BarePath on s.
func RegisterBare(s grpc.ServiceRegistrar) {
	desc := grpc.ServiceDesc{
		ServiceName: pb.PluginFrameworkService_ServiceDesc.ServiceName,
		HandlerType: (*testgrpc.TestServiceServer)(nil),
	}
	for _, st := range testgrpc.TestService_ServiceDesc.Streams {
		if st.StreamName == "FullDuplexCall" {
			d := bareDesc
			d.Handler = st.Handler
			desc.Streams = append(desc.Streams, d)
		}
	}
	s.RegisterService(&desc, Service{})
}

// Path is one way of reaching Service.
type Path interface {
	// Caller returns a function making one 64-byte round trip, for one
	// caller at a time; it holds what it opened until ctx ends.
	Caller(ctx context.Context) (func() error, error)
	// ServerStream receives n messages of size bytes.
	ServerStream(ctx context.Context, n, size int) error
	// ClientStream sends n messages of size bytes and waits for the end.
	ClientStream(ctx context.Context, n, size int) error
}

// Calls reaches Service with its own methods: UnaryCall,
// StreamingOutputCall and StreamingInputCall (direct gRPC, or the tunnel).
type Calls struct{ C testgrpc.TestServiceClient }

func (p Calls) Caller(ctx context.Context) (func() error, error) {
	req := &testgrpc.SimpleRequest{ResponseSize: UnarySize, Payload: body(UnarySize)}
	return func() error {
		_, err := p.C.UnaryCall(ctx, req)
		return err
	}, nil
}

func (p Calls) ServerStream(ctx context.Context, n, size int) error {
	params := make([]*testgrpc.ResponseParameters, n)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: int32(size)}
	}
	stream, err := p.C.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		return err
	}
	return recvN(stream, n)
}

func (p Calls) ClientStream(ctx context.Context, n, size int) error {
	stream, err := p.C.StreamingInputCall(ctx)
	if err != nil {
		return err
	}
	req := &testgrpc.StreamingInputCallRequest{Payload: body(int32(size))}
	for range n {
		if err := stream.Send(req); err != nil {
			return err
		}
	}
	r, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	if got, want := r.AggregatedPayloadSize, int32(n*size); got != want {
		return fmt.Errorf("client stream: %d bytes arrived, want %d", got, want)
	}
	return nil
}

// Bare reaches Service's FullDuplexCall at BarePath on a plain gRPC
// connection: the round trip is one message each way on an open stream,
// and the streams are one stream each, as in a tunnel.
type Bare struct{ CC grpc.ClientConnInterface }

type bareStream = grpc.GenericClientStream[testgrpc.StreamingOutputCallRequest, testgrpc.StreamingOutputCallResponse]

func (p Bare) open(ctx context.Context) (*bareStream, error) {
	s, err := p.CC.NewStream(ctx, &bareDesc, BarePath)
	if err != nil {
		return nil, err
	}
	return &bareStream{ClientStream: s}, nil
}

func (p Bare) Caller(ctx context.Context) (func() error, error) {
	s, err := p.open(ctx)
	if err != nil {
		return nil, err
	}
	req := &testgrpc.StreamingOutputCallRequest{Payload: body(UnarySize), ResponseParameters: []*testgrpc.ResponseParameters{{Size: UnarySize}}}
	return func() error {
		if err := s.Send(req); err != nil {
			return err
		}
		_, err := s.Recv()
		return err
	}, nil
}

func (p Bare) ServerStream(ctx context.Context, n, size int) error {
	s, err := p.open(ctx)
	if err != nil {
		return err
	}
	params := make([]*testgrpc.ResponseParameters, n)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: int32(size)}
	}
	if err := s.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}); err != nil {
		return err
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	return recvN(s, n)
}

func (p Bare) ClientStream(ctx context.Context, n, size int) error {
	s, err := p.open(ctx)
	if err != nil {
		return err
	}
	req := &testgrpc.StreamingOutputCallRequest{Payload: body(int32(size))}
	for range n {
		if err := s.Send(req); err != nil {
			return err
		}
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("client stream: %v, want the end", err)
	}
	return nil
}

// BareCalls reaches the same handler as Bare with a new gRPC call for
// each round trip: a unary call on the Connect method's path, which the
// stream handler answers with one message. Through a proxy it is what a
// plain gRPC call costs on the tunnel's route, where Bare is one message
// on a stream already open; only the unary benchmarks run on it
// (NamedPath.UnaryOnly), its streams being Bare's.
type BareCalls struct{ Bare }

func (p BareCalls) Caller(ctx context.Context) (func() error, error) {
	req := &testgrpc.StreamingOutputCallRequest{Payload: body(UnarySize), ResponseParameters: []*testgrpc.ResponseParameters{{Size: UnarySize}}}
	return func() error {
		return p.CC.Invoke(ctx, BarePath, req, new(testgrpc.StreamingOutputCallResponse))
	}, nil
}

func recvN[T any](s interface{ Recv() (*T, error) }, n int) error {
	for i := range n {
		if _, err := s.Recv(); err != nil {
			return fmt.Errorf("message %d of %d: %w", i, n, err)
		}
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("after %d messages: %v, want the end", n, err)
	}
	return nil
}

// NamedPath is a path and its name in the results.
type NamedPath struct {
	Name string
	Path Path
	// ProxyPID, when set, is a process on the path (a proxy) whose write
	// system calls are reported too, as proxy-writes/op.
	ProxyPID int
	// UnaryOnly: only the unary benchmarks run on this path.
	UnaryOnly bool
}

// Mode is one deployment: its name and the paths measured in it.
type Mode struct {
	Name  string
	Paths []NamedPath
}

// Round is the number of this run among the rounds `mage bench` makes
// ($OPF_BENCH_ROUND, default 0): it rotates the order of the paths, so
// that neither a control nor the tunnel always runs first.
func Round() int {
	n, _ := strconv.Atoi(os.Getenv("OPF_BENCH_ROUND"))
	return n
}

var benchmarks = []struct {
	name   string
	fn     func(*testing.B, NamedPath)
	stream bool
}{
	{"Unary64B", unary, false},
	{"Unary64BConcurrent16", concurrent, false},
	{"ServerStream1MiB", serverStream, true},
	{"ClientStream1MiB", clientStream, true},
}

// Run warms every path of the mode up, then runs each benchmark on each
// path, as sub-benchmarks <mode>/<benchmark>/<path>.
func Run(b *testing.B, m Mode) {
	for _, p := range m.Paths {
		if err := Warm(b.Context(), p.Path, !p.UnaryOnly); err != nil {
			b.Fatalf("%s/%s: warm-up: %v", m.Name, p.Name, err)
		}
	}
	for i, bm := range benchmarks {
		paths := slices.Clone(m.Paths)
		k := (Round() + i) % len(paths)
		paths = append(paths[k:], paths[:k]...)
		for _, p := range paths {
			if bm.stream && p.UnaryOnly {
				continue
			}
			b.Run(m.Name+"/"+bm.name+"/"+p.Name, func(b *testing.B) { bm.fn(b, p) })
		}
	}
}

// Warm runs every kind of call on p for a moment: connections are up,
// HTTP/2 windows have grown (grpc-go's BDP estimation) and the pools are
// filled before anything is measured; the streams only when streams is
// set.
func Warm(ctx context.Context, p Path, streams bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call, err := p.Caller(ctx)
	if err != nil {
		return err
	}
	for start := time.Now(); time.Since(start) < 200*time.Millisecond; {
		if err := call(); err != nil {
			return err
		}
	}
	if !streams {
		return nil
	}
	if err := p.ServerStream(ctx, 32, StreamSize); err != nil {
		return err
	}
	return p.ClientStream(ctx, 32, StreamSize)
}

// unary reports the median and the 99th percentile latency of sequential
// 64-byte round trips.
func unary(b *testing.B, np NamedPath) {
	p := np.Path
	ctx, cancel := context.WithCancel(b.Context())
	defer cancel()
	call, err := p.Caller(ctx)
	if err != nil {
		b.Fatal(err)
	}
	for range 10 {
		if err := call(); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs() // both ends of the call are in this process
	w0 := countWrites(np)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if err := call(); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportWrites(b, np, w0)
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

// concurrent reports the throughput of 16 callers making 64-byte round
// trips at once.
func concurrent(b *testing.B, np NamedPath) {
	p := np.Path
	ctx, cancel := context.WithCancel(b.Context())
	defer cancel()
	calls := make([]func() error, Callers)
	for i := range calls {
		var err error
		if calls[i], err = p.Caller(ctx); err != nil {
			b.Fatal(err)
		}
		if err := calls[i](); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for w, call := range calls {
		wg.Go(func() {
			for i := w; i < b.N; i += Callers {
				if err := call(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "calls/s")
}

// serverStream reports the throughput of one stream of 1 MiB messages
// from the service.
func serverStream(b *testing.B, np NamedPath) { streamThroughput(b, np, np.Path.ServerStream) }

// clientStream reports the throughput of one stream of 1 MiB messages to
// the service.
func clientStream(b *testing.B, np NamedPath) { streamThroughput(b, np, np.Path.ClientStream) }

// streamThroughput times stream (a Path's ServerStream or ClientStream)
// carrying b.N messages, after a short one that opens the way.
func streamThroughput(b *testing.B, np NamedPath, stream func(ctx context.Context, n, size int) error) {
	if err := stream(b.Context(), 2, StreamSize); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(StreamSize)
	w0 := countWrites(np)
	b.ResetTimer()
	if err := stream(b.Context(), b.N, StreamSize); err != nil {
		b.Fatal(err)
	}
	reportWrites(b, np, w0)
}

// writeSyscalls is the number of write system calls the process has made
// (Linux's /proc/self/io), or -1. Both ends of every path are in this
// process (a proxy is not), so its growth per call tells how many writes
// a call costs: each one a separate TLS record, HTTP/2 DATA frame, and
// read and write in a proxy on the way.
func writeSyscalls() int64 { return procWrites("self") }

// procWrites is writeSyscalls for process pid ("self": this one).
func procWrites(pid string) int64 {
	data, err := os.ReadFile("/proc/" + pid + "/io")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}

// writes counts the write system calls and the CPU time of this process
// and of the path's proxy, if any. CPU time per call is what a loaded
// machine disturbs least: where wall-clock ratios jump from run to run, it
// tells which side does more work.
type writes struct {
	self, proxy       int64
	selfCPU, proxyCPU time.Duration
}

func countWrites(np NamedPath) writes {
	w := writes{self: writeSyscalls(), proxy: -1, selfCPU: procCPU("self"), proxyCPU: -1}
	if np.ProxyPID != 0 {
		pid := strconv.Itoa(np.ProxyPID)
		w.proxy, w.proxyCPU = procWrites(pid), procCPU(pid)
	}
	return w
}

// procCPU is the user and system CPU time process pid has used
// (/proc/PID/stat, in clock ticks of 10 ms), or -1.
func procCPU(pid string) time.Duration {
	data, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return -1
	}
	// The command name, in parentheses, may hold spaces: count from after it.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return -1
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// reportWrites reports the write system calls per operation since w0.
func reportWrites(b *testing.B, np NamedPath, w0 writes) {
	w1 := countWrites(np)
	if w0.self >= 0 && w1.self >= 0 {
		b.ReportMetric(float64(w1.self-w0.self)/float64(b.N), "writes/op")
	}
	if w0.proxy >= 0 && w1.proxy >= 0 {
		b.ReportMetric(float64(w1.proxy-w0.proxy)/float64(b.N), "proxy-writes/op")
	}
	if w0.selfCPU >= 0 && w1.selfCPU >= 0 {
		b.ReportMetric(float64((w1.selfCPU-w0.selfCPU).Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
	if w0.proxyCPU >= 0 && w1.proxyCPU >= 0 {
		b.ReportMetric(float64((w1.proxyCPU-w0.proxyCPU).Nanoseconds())/float64(b.N), "proxy-cpu-ns/op")
	}
}
