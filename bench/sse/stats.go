package main

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// quantile of sorted latencies (µs); 0 for none.
func quantile(sorted []int32, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return int64(sorted[min(int(p*float64(len(sorted))), len(sorted)-1)])
}

func median(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	w := slices.Clone(v)
	slices.Sort(w)
	if len(w)%2 == 1 {
		return float64(w[len(w)/2])
	}
	return float64(w[len(w)/2-1]+w[len(w)/2]) / 2
}

// meanCI is the mean of v and the half-width of its 95 % confidence
// interval (Student's t, for the few pairs a run has).
func meanCI(v []int64) (float64, float64) {
	n := len(v)
	if n == 0 {
		return 0, 0
	}
	var sum float64
	for _, x := range v {
		sum += float64(x)
	}
	mean := sum / float64(n)
	if n < 2 {
		return mean, 0
	}
	var ss float64
	for _, x := range v {
		ss += (float64(x) - mean) * (float64(x) - mean)
	}
	sd := math.Sqrt(ss / float64(n-1))
	// t(0.975, n-1) for n-1 = 1..10; beyond, 2.0 is close enough.
	t := []float64{12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23}
	tv := 2.0
	if n-1 <= len(t) {
		tv = t[n-2]
	}
	return mean, tv * sd / math.Sqrt(float64(n))
}

// cpuTicks sums utime and stime of the processes (/proc/<pid>/stat).
func cpuTicks(pids []int) int64 {
	var sum int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		// The command may hold spaces; the fields follow its closing paren.
		rest := b[bytes.LastIndexByte(b, ')')+2:]
		f := strings.Fields(string(rest))
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			s, _ := strconv.ParseInt(f[12], 10, 64)
			sum += u + s
		}
	}
	return sum
}

// rssKB sums VmRSS of the processes.
func rssKB(pids []int) int64 {
	var sum int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				sum += kb
			}
		}
	}
	return sum
}
