// Command report reads `go test -bench` output of go/internal/bench,
// go/internal/e2e and conformance/sdkbench (benchmarks named
// Benchmark<Package>/<mode>/<benchmark>/<path>)
// and prints, per deployment mode, the median of each path over the
// rounds, the ratio of the tunnel to its control and the target it must
// meet. It exits 1 when a target is missed or results are missing, after
// printing every row.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// row compares num with den (each mode/benchmark/path) on metric.
type row struct {
	title         string
	metric        string
	num, den      string
	lowerIsBetter bool
	limit         float64 // 0: no target, the ratio is shown for information
	describe      string
}

// rows are printed in this order; a mode whose results are all absent
// (the Kubernetes binaries were missing) is reported as skipped.
var rows = []row{
	// Plaintext unix socket: the targets the tunnel has always had, against
	// direct gRPC calls.
	{"plain unary p50", "p50-ns", "plain/Unary64B/tunnel", "plain/Unary64B/direct", true, 1.10, "tunnel within 1.10x of a direct call"},
	{"plain unary p99", "p99-ns", "plain/Unary64B/tunnel", "plain/Unary64B/direct", true, 0, ""},
	{"plain unary 16-way", "calls/s", "plain/Unary64BConcurrent16/tunnel", "plain/Unary64BConcurrent16/direct", false, 0.9, "tunnel at least 0.9x of direct throughput"},
	{"plain server stream 1 MiB", "MB/s", "plain/ServerStream1MiB/tunnel", "plain/ServerStream1MiB/direct", false, 0.7, "tunnel at least 0.7x of direct"},
	{"plain client stream 1 MiB", "MB/s", "plain/ClientStream1MiB/tunnel", "plain/ClientStream1MiB/direct", false, 0.7, "tunnel at least 0.7x of direct"},
	{"plain unary p50 vs bare", "p50-ns", "plain/Unary64B/tunnel", "plain/Unary64B/bare", true, 0, "a message each way on an open stream"},
	{"plain direct call vs bare p50", "p50-ns", "plain/Unary64B/direct", "plain/Unary64B/bare", true, 0, "what any unary call adds to a message on an open stream"},
	{"plain server stream vs bare", "MB/s", "plain/ServerStream1MiB/tunnel", "plain/ServerStream1MiB/bare", false, 0, ""},
	{"plain client stream vs bare", "MB/s", "plain/ClientStream1MiB/tunnel", "plain/ClientStream1MiB/bare", false, 0, ""},

	// Built-in TLS + token on loopback TCP, against a bare stream over TLS.
	{"tls unary p50", "p50-ns", "tls/Unary64B/tunnel", "tls/Unary64B/bare", true, 0, "control: bare stream over TLS"},
	{"tls unary p99", "p99-ns", "tls/Unary64B/tunnel", "tls/Unary64B/bare", true, 0, ""},
	{"tls unary p50 vs a gRPC call", "p50-ns", "tls/Unary64B/tunnel", "tls/Unary64B/call", true, 0, "control: a new unary call on the bare server"},
	{"tls gRPC call vs bare p50", "p50-ns", "tls/Unary64B/call", "tls/Unary64B/bare", true, 0, "what any unary call adds to a message on an open stream"},
	{"tls unary 16-way", "calls/s", "tls/Unary64BConcurrent16/tunnel", "tls/Unary64BConcurrent16/bare", false, 0, "control: 16 bare streams"},
	{"tls server stream 1 MiB", "MB/s", "tls/ServerStream1MiB/tunnel", "tls/ServerStream1MiB/bare", false, 0, ""},
	{"tls client stream 1 MiB", "MB/s", "tls/ClientStream1MiB/tunnel", "tls/ClientStream1MiB/bare", false, 0, ""},
	// What TLS (and TCP instead of a unix socket) costs, tunnel and control.
	{"tls/plain tunnel unary p50", "p50-ns", "tls/Unary64B/tunnel", "plain/Unary64B/tunnel", true, 1.2, "TLS tunnel within 1.2x of plaintext"},
	{"tls/plain tunnel server stream", "MB/s", "tls/ServerStream1MiB/tunnel", "plain/ServerStream1MiB/tunnel", false, 0.8, "TLS tunnel at least 0.8x of plaintext"},
	{"tls/plain tunnel client stream", "MB/s", "tls/ClientStream1MiB/tunnel", "plain/ClientStream1MiB/tunnel", false, 0.8, "TLS tunnel at least 0.8x of plaintext"},
	{"tls/plain bare unary p50", "p50-ns", "tls/Unary64B/bare", "plain/Unary64B/bare", true, 0, "the same for the control"},
	{"tls/plain bare server stream", "MB/s", "tls/ServerStream1MiB/bare", "plain/ServerStream1MiB/bare", false, 0, ""},
	{"tls/plain bare client stream", "MB/s", "tls/ClientStream1MiB/bare", "plain/ClientStream1MiB/bare", false, 0, ""},

	// Behind kube-rbac-proxy, against a bare stream through a proxy with
	// the same arguments.
	{"proxy unary p50", "p50-ns", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 1.10, "tunnel within 1.10x of a bare round trip through the proxy"},
	{"proxy unary p99", "p99-ns", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 0, ""},
	{"proxy unary p50 vs a gRPC call", "p50-ns", "proxy/Unary64B/tunnel", "proxy/Unary64B/call", true, 0, "control: a new unary call through the proxy"},
	{"proxy gRPC call vs bare p50", "p50-ns", "proxy/Unary64B/call", "proxy/Unary64B/bare", true, 0, "what any unary call adds to a message on an open stream"},
	{"proxy 16-way vs gRPC calls", "calls/s", "proxy/Unary64BConcurrent16/tunnel", "proxy/Unary64BConcurrent16/call", false, 0, ""},
	{"proxy unary 16-way", "calls/s", "proxy/Unary64BConcurrent16/tunnel", "proxy/Unary64BConcurrent16/bare", false, 0, "control: 16 bare streams"},
	{"proxy server stream 1 MiB", "MB/s", "proxy/ServerStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", false, 0.8, "tunnel at least 0.8x of a bare stream through the proxy"},
	{"proxy client stream 1 MiB", "MB/s", "proxy/ClientStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", false, 0.8, "tunnel at least 0.8x of a bare stream through the proxy"},
	// A tunnel turns HTTP around: the plugin is the HTTP client, so a
	// server stream's data goes up the Connect request's body, as a bare
	// client stream's does, and a client stream's comes down in the response.
	{"proxy tunnel server vs bare client", "MB/s", "proxy/ServerStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", false, 0, "the same HTTP direction: plugin to operator, upload"},
	{"proxy tunnel client vs bare server", "MB/s", "proxy/ClientStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", false, 0, "the same HTTP direction: download"},
	// Writes per call in the benchmark's process (both ends; not the proxy's).
	{"proxy unary writes per call", "writes/op", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 0, ""},
	{"proxy server stream writes/MiB", "writes/op", "proxy/ServerStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", true, 0, ""},
	{"proxy client stream writes/MiB", "writes/op", "proxy/ClientStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", true, 0, ""},
	{"proxy unary proxy's writes/call", "proxy-writes/op", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 0, "writes kube-rbac-proxy makes"},
	{"proxy server stream proxy's w/MiB", "proxy-writes/op", "proxy/ServerStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", true, 0, ""},
	{"proxy client stream proxy's w/MiB", "proxy-writes/op", "proxy/ClientStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", true, 0, ""},

	// CPU time per call or per MiB (µs), both ends together; the proxy's
	// apart. Less disturbed by the machine's load than wall-clock time.
	{"plain unary CPU/call", "cpu-ns/op", "plain/Unary64B/tunnel", "plain/Unary64B/direct", true, 0, ""},
	{"plain unary CPU/call vs bare", "cpu-ns/op", "plain/Unary64B/tunnel", "plain/Unary64B/bare", true, 0, ""},
	{"plain server stream CPU/MiB", "cpu-ns/op", "plain/ServerStream1MiB/tunnel", "plain/ServerStream1MiB/bare", true, 0, ""},
	{"plain client stream CPU/MiB", "cpu-ns/op", "plain/ClientStream1MiB/tunnel", "plain/ClientStream1MiB/bare", true, 0, ""},
	{"tls unary CPU/call", "cpu-ns/op", "tls/Unary64B/tunnel", "tls/Unary64B/bare", true, 0, ""},
	{"tls server stream CPU/MiB", "cpu-ns/op", "tls/ServerStream1MiB/tunnel", "tls/ServerStream1MiB/bare", true, 0, ""},
	{"tls client stream CPU/MiB", "cpu-ns/op", "tls/ClientStream1MiB/tunnel", "tls/ClientStream1MiB/bare", true, 0, ""},
	{"proxy unary CPU/call", "cpu-ns/op", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 0, "the benchmark's process"},
	{"proxy unary CPU vs a gRPC call", "cpu-ns/op", "proxy/Unary64B/tunnel", "proxy/Unary64B/call", true, 0, ""},
	{"proxy unary proxy's CPU/call", "proxy-cpu-ns/op", "proxy/Unary64B/tunnel", "proxy/Unary64B/bare", true, 0, "kube-rbac-proxy's"},
	{"proxy server stream CPU/MiB", "cpu-ns/op", "proxy/ServerStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", true, 0, ""},
	{"proxy server stream proxy CPU", "proxy-cpu-ns/op", "proxy/ServerStream1MiB/tunnel", "proxy/ServerStream1MiB/bare", true, 0, ""},
	{"proxy client stream CPU/MiB", "cpu-ns/op", "proxy/ClientStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", true, 0, ""},
	{"proxy client stream proxy CPU", "proxy-cpu-ns/op", "proxy/ClientStream1MiB/tunnel", "proxy/ClientStream1MiB/bare", true, 0, ""},

	// The Python and Rust plugins (conformance/sdkbench), called from Go
	// through the tunnel and on their own language's gRPC server.
	{"python unary 64 B", "calls/s", "python/Unary64B/tunnel", "python/Unary64B/direct", false, 0.7, "tunnel at least 0.7x of grpc.aio's throughput"},
	{"python unary p50", "p50-ns", "python/Unary64B/tunnel", "python/Unary64B/direct", true, 0, ""},
	{"python server stream 1 MiB", "MB/s", "python/ServerStream1MiB/tunnel", "python/ServerStream1MiB/direct", false, 0.7, "tunnel at least 0.7x of grpc.aio"},
	{"rust unary 64 B", "calls/s", "rust/Unary64B/tunnel", "rust/Unary64B/direct", false, 0.9, "tunnel at least 0.9x of tonic's throughput"},
	{"rust unary p50", "p50-ns", "rust/Unary64B/tunnel", "rust/Unary64B/direct", true, 0, ""},
	{"rust server stream 1 MiB", "MB/s", "rust/ServerStream1MiB/tunnel", "rust/ServerStream1MiB/direct", false, 0.8, "tunnel at least 0.8x of tonic"},
}

func main() {
	skipped := flag.String("skipped", "", "modes not run, and why (MODE[,MODE]=reason[;MODE...=reason])")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: report [-skipped MODES=reason] BENCH_OUTPUT")
		os.Exit(2)
	}
	values, err := parse(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	skip := map[string]string{}
	for _, entry := range strings.Split(*skipped, ";") {
		if modes, why, ok := strings.Cut(entry, "="); ok {
			for _, m := range strings.Split(modes, ",") {
				skip[m] = why
			}
		}
	}

	failed := false
	fmt.Printf("%-32s %12s %12s %7s %8s %-6s  %s\n", "median of rounds", "baseline", "measured", "ratio", "target", "", "")
	said := map[string]bool{}
	for _, r := range rows {
		modes := []string{mode(r.num), mode(r.den)}
		if why := skip[modes[0]] + skip[modes[1]]; why != "" {
			for _, m := range modes {
				if skip[m] != "" && !said[m] {
					said[m] = true
					fmt.Printf("%-32s SKIPPED: %s\n", m+" mode", skip[m])
				}
			}
			if r.limit != 0 {
				fmt.Printf("%-32s %12s %12s %7s %8s %-6s\n", r.title, "-", "-", "-", target(r), "NOT RUN")
				failed = true
			}
			continue
		}
		n, d := median(values[r.num][r.metric]), median(values[r.den][r.metric])
		if n == 0 || d == 0 {
			fmt.Printf("%-32s missing results (%s %s, %s %s)\n", r.title, r.num, r.metric, r.den, r.metric)
			failed = true
			continue
		}
		ratio := n / d
		mark := ""
		if r.limit != 0 {
			ok := ratio >= r.limit
			if r.lowerIsBetter {
				ok = ratio <= r.limit
			}
			mark = "ok"
			if !ok {
				mark, failed = "MISSED", true
			}
		}
		desc := fmt.Sprintf("%s, n=%d", unit(r.metric), len(values[r.num][r.metric]))
		if r.describe != "" {
			desc += ": " + r.describe
		}
		fmt.Printf("%-32s %12s %12s %7.3f %8s %-6s  %s\n", r.title, num(d, r.metric), num(n, r.metric), ratio, target(r), mark, desc)
	}
	if failed {
		fmt.Println("some targets are MISSED or were not measured")
		os.Exit(1)
	}
}

func mode(key string) string {
	m, _, _ := strings.Cut(key, "/")
	return m
}

func target(r row) string {
	switch {
	case r.limit == 0:
		return "-"
	case r.lowerIsBetter:
		return fmt.Sprintf("<=%.2f", r.limit)
	default:
		return fmt.Sprintf(">=%.2f", r.limit)
	}
}

// num shows latencies and CPU times in µs, the rest as measured.
func num(v float64, metric string) string {
	if strings.HasSuffix(metric, "-ns") || strings.HasSuffix(metric, "-ns/op") {
		return fmt.Sprintf("%.1f", v/1e3)
	}
	return fmt.Sprintf("%.1f", v)
}

func unit(metric string) string {
	if strings.HasSuffix(metric, "-ns") || strings.HasSuffix(metric, "-ns/op") {
		return "µs"
	}
	return metric
}

// parse returns values[mode/benchmark/path][metric] = samples, one per run.
func parse(path string) (map[string]map[string][]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	values := map[string]map[string][]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		name := fields[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i] // drop the GOMAXPROCS suffix
		}
		_, name, ok := strings.Cut(name, "/") // drop Benchmark<Package>
		if !ok {
			continue
		}
		if values[name] == nil {
			values[name] = map[string][]float64{}
		}
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err == nil {
				values[name][fields[i+1]] = append(values[name][fields[i+1]], v)
			}
		}
	}
	return values, sc.Err()
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
