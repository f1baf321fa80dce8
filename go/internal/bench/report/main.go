// Command report reads `go test -bench` output of package bench and prints,
// for each benchmark, the median of the tunnel and of direct gRPC, their
// ratio and the target it must meet.
package main

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// target: the metric compared and the ratio tunnel/direct it must reach.
type target struct {
	bench, metric string
	lowerIsBetter bool
	limit         float64
	describe      string
}

var targets = []target{
	{"BenchmarkUnary64B", "p50-ns", true, 1.10, "unary 64 B, p50 latency: tunnel within 1.10x of direct"},
	{"BenchmarkUnary64BConcurrent16", "calls/s", false, 0.9, "unary 64 B, 16 callers: tunnel at least 0.9x of direct throughput"},
	{"BenchmarkStream1MiB", "MB/s", false, 0.7, "server stream of 1 MiB messages: tunnel at least 0.7x of direct throughput"},
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: report BENCH_OUTPUT")
		os.Exit(2)
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer f.Close()
	// values[bench/path][metric] = samples
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
	failed := false
	fmt.Printf("%-34s %14s %14s %8s %7s\n", "benchmark (median of runs)", "direct", "tunnel", "ratio", "target")
	for _, t := range targets {
		d := median(values[t.bench+"/direct"][t.metric])
		tu := median(values[t.bench+"/tunnel"][t.metric])
		if d == 0 || tu == 0 {
			fmt.Printf("%-34s missing results\n", t.bench)
			failed = true
			continue
		}
		ratio := tu / d
		ok := ratio >= t.limit
		cmp := ">="
		if t.lowerIsBetter {
			ok, cmp = ratio <= t.limit, "<="
		}
		mark := "ok"
		if !ok {
			mark, failed = "MISSED", true
		}
		fmt.Printf("%-34s %14.1f %14.1f %8.3f %3s%.2f %s  (%s, n=%d)\n", strings.TrimPrefix(t.bench, "Benchmark")+" "+t.metric,
			d, tu, ratio, cmp, t.limit, mark, t.describe, len(values[t.bench+"/tunnel"][t.metric]))
	}
	if failed {
		os.Exit(1)
	}
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
