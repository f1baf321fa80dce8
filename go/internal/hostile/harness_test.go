package hostile

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/proto"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/mem"
	protobuf "google.golang.org/protobuf/proto"

	"github.com/guilhem/operator-plugin-framework/go/client"
	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
)

func TestMain(m *testing.M) {
	if raw := os.Getenv(childEnv); raw != "" {
		os.Exit(runChild(raw))
	}
	code := m.Run()
	stopAPIServer()
	if code == 0 {
		if err := goleak.Find(
			// client-go's shared transports keep idle connections to envtest.
			goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
			goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
			goleak.IgnoreTopFunction("golang.org/x/net/http2.(*ClientConn).readLoop"),
			goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
		); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// child is a server process under attack.
type child struct {
	t     *testing.T
	cmd   *exec.Cmd
	addr  string // plugins' address
	stats string // control endpoint
	logs  *logMeter

	mu              sync.Mutex
	maxGoroutines   int
	maxConnections  int // the server's gauges, at most
	maxUnregistered int
	stopSampling    func()
}

// startChild runs the server in a child process until the test ends.
func startChild(t *testing.T, cfg childConfig) *child {
	t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := &logMeter{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	c := &child{t: t, cmd: cmd, logs: logs}
	t.Cleanup(func() {
		c.stopSampling()
		stdin.Close()
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("server log (first lines):\n%s", logs.head())
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case s := <-line:
		var info childInfo
		if err := json.Unmarshal([]byte(s), &info); err != nil {
			t.Fatalf("child: %q: %v\n%s", s, err, logs.head())
		}
		c.addr, c.stats = info.Addr, info.Stats
	case <-time.After(30 * time.Second):
		t.Fatalf("child did not start\n%s", logs.head())
	}
	c.stopSampling = c.sample()
	return c
}

// sample records the child's goroutines every 20 ms.
func (c *child) sample() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if st, err := c.getStats(); err == nil {
				c.mu.Lock()
				c.maxGoroutines = max(c.maxGoroutines, st.Goroutines)
				c.maxConnections = max(c.maxConnections, st.Connections)
				c.maxUnregistered = max(c.maxUnregistered, st.Unregistered)
				c.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { cancel(); <-done }) }
}

var statsClient = &http.Client{Timeout: 5 * time.Second}

func (c *child) getStats() (stats, error) {
	var st stats
	resp, err := statsClient.Get(c.stats + "/stats")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// memory returns the child's peak and current resident memory, in bytes.
func (c *child) memory() (peak, now int64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		c.t.Fatalf("child memory: %v", err)
	}
	for l := range strings.SplitSeq(string(data), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmHWM":
			peak = kb << 10
		case "VmRSS":
			now = kb << 10
		}
	}
	return peak, now
}

// get calls the control endpoint and fails the test on an error.
func (c *child) get(path string) {
	c.t.Helper()
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Get(c.stats + path)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		c.t.Fatalf("%s: %s: %s", path, resp.Status, body)
	}
}

// servesPlugins checks that the server still works: a real plugin
// registers, and the server's call to it succeeds.
func (c *child) servesPlugins(opts ...client.Option) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	opts = append([]client.Option{
		client.WithBackoff(backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, MaxDelay: time.Second}),
		client.WithLogger(logr.Discard()),
	}, opts...)
	p, err := client.New(ctx, "legit", c.addr, "v1", &testgrpc.TestService_ServiceDesc, &testservice.Service{}, opts...)
	if err != nil {
		c.t.Fatal(err)
	}
	defer p.Close()
	if err := p.Ready(ctx); err != nil {
		c.t.Fatalf("a real plugin cannot register after the attack: %v", err)
	}
	c.get("/call?plugin=legit")
}

// measurement is what an attack did to the server.
type measurement struct {
	Attack        string `json:"attack"`
	PeakRSS       int64  `json:"peakRSS"`
	RSSBefore     int64  `json:"rssBefore"`
	MaxGoroutines int    `json:"maxGoroutines"`
	// The server's connections and unregistered tunnels, at most (its
	// gauges, sampled).
	MaxConnections  int    `json:"maxConnections"`
	MaxUnregistered int    `json:"maxUnregistered"`
	TokenReviews    int64  `json:"tokenReviews"`
	LogBytes        int64  `json:"logBytes"`
	LogLines        int64  `json:"logLines"`
	LongestLine     int    `json:"longestLogLine"`
	Elapsed         string `json:"elapsed"`
}

// attack runs fn against c and reports what it cost the server.
func (c *child) attack(name string, fn func()) measurement {
	c.t.Helper()
	_, before := c.memory()
	st0, _ := c.getStats()
	start := time.Now()
	fn()
	elapsed := time.Since(start)
	time.Sleep(100 * time.Millisecond) // one more sample after the attack
	c.mu.Lock()
	maxG, maxC, maxU := c.maxGoroutines, c.maxConnections, c.maxUnregistered
	c.mu.Unlock()
	st, _ := c.getStats()
	peak, _ := c.memory()
	bytes, lines, longest := c.logs.totals()
	m := measurement{
		Attack: name, PeakRSS: peak, RSSBefore: before, MaxGoroutines: maxG, MaxConnections: maxC, MaxUnregistered: maxU,
		TokenReviews: st.TokenReview - st0.TokenReview,
		LogBytes:     bytes, LogLines: lines, LongestLine: longest,
		Elapsed: elapsed.Round(time.Millisecond).String(),
	}
	c.t.Logf("%s: peak RSS %d MiB (%d MiB before), %d goroutines, %d connections and %d unregistered tunnels at most, %d TokenReviews, %d log lines (%d bytes, longest %d), in %s",
		name, peak>>20, before>>20, maxG, maxC, maxU, m.TokenReviews, lines, bytes, longest, m.Elapsed)
	if path := os.Getenv("HOSTILE_RESULTS"); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			_ = json.NewEncoder(f).Encode(m)
			f.Close()
		}
	}
	return m
}

// logMeter counts what the child logs and keeps its beginning.
type logMeter struct {
	mu      sync.Mutex
	bytes   int64
	lines   int64
	longest int
	partial int
	first   strings.Builder
}

func (l *logMeter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.bytes += int64(len(p))
	for _, b := range p {
		if b == '\n' {
			l.lines++
			l.longest = max(l.longest, l.partial)
			l.partial = 0
		} else {
			l.partial++
		}
	}
	if l.first.Len() < 16<<10 {
		l.first.Write(p[:min(len(p), 16<<10-l.first.Len())])
	}
	return len(p), nil
}

func (l *logMeter) totals() (bytes, lines int64, longest int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.bytes, l.lines, max(l.longest, l.partial)
}

func (l *logMeter) head() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first.String()
}

// rawCodec sends pre-encoded batches ([]byte) or messages, and decodes
// the operator's batches as ConnectResponse.
type rawCodec struct{}

func (rawCodec) Name() string { return proto.Name }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.([]byte); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	b, err := protobuf.Marshal(v.(protobuf.Message))
	return mem.BufferSlice{mem.SliceBuffer(b)}, err
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return protobuf.Unmarshal(data.Materialize(), v.(protobuf.Message))
}

// dial opens a gRPC connection to addr from the loopback address from
// (127.0.0.2, ...), so that the attacker is a peer of its own.
func dial(t testing.TB, addr, from string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	cc, err := grpc.NewClient("passthrough:///"+addr, append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return d.DialContext(ctx, "tcp", a) }),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallSendMsgSize(1<<30), grpc.MaxCallRecvMsgSize(1<<30)),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

const connectMethod = "/pluginframework.v1.PluginFrameworkService/Connect"

// connect opens a Connect stream on cc.
func connect(ctx context.Context, cc *grpc.ClientConn) (grpc.ClientStream, error) {
	return cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, connectMethod)
}

// encode is a batch of frames, encoded.
func encode(frames ...*pb.Frame) []byte {
	b, err := protobuf.Marshal(&pb.ConnectRequest{Frames: frames})
	if err != nil {
		panic(err)
	}
	return b
}

func hello(s *pb.Settings) *pb.Frame {
	if s == nil {
		s = &pb.Settings{}
	}
	return &pb.Frame{Kind: &pb.Frame_Hello{Hello: &pb.Hello{MinVersion: 2, MaxVersion: 2, Settings: s}}}
}

func register(name, version string) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Register{Register: &pb.Register{Name: name, Version: version, Services: []string{"grpc.testing.TestService"}}}}
}

// emptyFrames is a batch of n empty frames (0a 00 repeated): each decodes
// to a Frame of no kind, which the receiver must skip (spec 15).
func emptyFrames(n int) []byte {
	b := make([]byte, 2*n)
	for i := 0; i < len(b); i += 2 {
		b[i] = 0x0a
	}
	return b
}

// recvUntilEnd reads the operator's batches until the stream ends, and
// returns the frames read and the end.
func recvUntilEnd(s grpc.ClientStream) ([]*pb.Frame, error) {
	var frames []*pb.Frame
	for {
		var m pb.ConnectResponse
		if err := s.RecvMsg(&m); err != nil {
			return frames, err
		}
		frames = append(frames, m.GetFrames()...)
	}
}
