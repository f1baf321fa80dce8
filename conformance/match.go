package conformance

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// match checks got (a received value in matchable form) against want (case
// data). Objects match when every key of want matches (got may have more);
// lists when they have the same length and match element by element;
// numbers by value. A null wants an unset value (null, zero, empty). An
// object with one "$" key is an operator:
//
//	$between: [low, high]  a number or duration in the closed range
//	$contains: [...]       a list holding elements matching each of these
//	$contains: text        a string containing the text
//	$len: n                a list, object or string of that length
//	$any: true             anything, even unset
//	$not: value            anything that does not match value
func match(path string, want, got any) error {
	switch w := want.(type) {
	case nil:
		if !unset(got) {
			return fmt.Errorf("%s: got %s, want unset", path, show(got))
		}
		return nil
	case map[string]any:
		if op, arg, ok := operator(w); ok {
			return matchOp(path, op, arg, got)
		}
		g, ok := got.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: got %s, want an object", path, show(got))
		}
		for _, k := range slices.Sorted(maps.Keys(w)) {
			gv, ok := g[k]
			if !ok {
				if unset(w[k]) {
					continue
				}
				return fmt.Errorf("%s: no field %q (fields: %s)", path, k, strings.Join(slices.Sorted(maps.Keys(g)), ", "))
			}
			if err := match(join(path, k), w[k], gv); err != nil {
				return err
			}
		}
		return nil
	case []any:
		g, ok := got.([]any)
		if !ok {
			if unset(got) && len(w) == 0 {
				return nil
			}
			return fmt.Errorf("%s: got %s, want a list of %d", path, show(got), len(w))
		}
		if len(g) != len(w) {
			return fmt.Errorf("%s: got %d elements %s, want %d", path, len(g), show(got), len(w))
		}
		for i := range w {
			if err := match(fmt.Sprintf("%s[%d]", path, i), w[i], g[i]); err != nil {
				return err
			}
		}
		return nil
	case []string:
		l := make([]any, len(w))
		for i, s := range w {
			l[i] = s
		}
		return match(path, l, got)
	case bool:
		if got == nil && !w {
			return nil
		}
		if g, ok := got.(bool); !ok || g != w {
			return fmt.Errorf("%s: got %s, want %v", path, show(got), w)
		}
		return nil
	case string:
		if g, ok := got.(string); ok && g == w {
			return nil
		}
		if got == nil && w == "" {
			return nil
		}
		// A size or a number written as text ("3MiB").
		if gn, ok := number(got); ok && got != nil {
			if _, isString := got.(string); !isString {
				if wn, ok := number(w); ok && wn == gn {
					return nil
				}
			}
		}
		// A duration written another way ("2s" for "2000ms").
		if g, ok := got.(string); ok {
			wd, err1 := time.ParseDuration(w)
			gd, err2 := time.ParseDuration(g)
			if err1 == nil && err2 == nil && wd == gd {
				return nil
			}
		}
		return fmt.Errorf("%s: got %s, want %q", path, show(got), w)
	default:
		wn, ok := number(want)
		if !ok {
			return fmt.Errorf("%s: cannot match %T", path, want)
		}
		gn, ok := number(got)
		if !ok && got == nil {
			gn, ok = 0, true
		}
		if !ok || gn != wn {
			return fmt.Errorf("%s: got %s, want %v", path, show(got), want)
		}
		return nil
	}
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

func operator(m map[string]any) (string, any, bool) {
	if len(m) != 1 {
		return "", nil, false
	}
	for k, v := range m {
		if strings.HasPrefix(k, "$") {
			return k, v, true
		}
	}
	return "", nil, false
}

func matchOp(path, op string, arg, got any) error {
	switch op {
	case "$any":
		return nil
	case "$not":
		if match(path, arg, got) == nil {
			return fmt.Errorf("%s: got %s, want anything but %v", path, show(got), arg)
		}
		return nil
	case "$len":
		n, ok := number(arg)
		if !ok {
			return fmt.Errorf("%s: $len wants a number", path)
		}
		l := -1
		switch g := got.(type) {
		case []any:
			l = len(g)
		case map[string]any:
			l = len(g)
		case string:
			l = len(g)
		case nil:
			l = 0
		}
		if float64(l) != n {
			return fmt.Errorf("%s: got length %d (%s), want %v", path, l, show(got), n)
		}
		return nil
	case "$contains":
		if s, ok := arg.(string); ok {
			g, ok := got.(string)
			if !ok || !strings.Contains(g, s) {
				return fmt.Errorf("%s: got %s, want text containing %q", path, show(got), s)
			}
			return nil
		}
		wl, ok := arg.([]any)
		if !ok {
			return fmt.Errorf("%s: $contains wants a list or a string", path)
		}
		gl, _ := got.([]any)
		for _, w := range wl {
			found := false
			for _, g := range gl {
				if match(path, w, g) == nil {
					found = true
					break
				}
			}
			if !found {
				return fmt.Errorf("%s: got %s, want an element matching %v", path, show(got), w)
			}
		}
		return nil
	case "$between":
		r, ok := arg.([]any)
		if !ok || len(r) != 2 {
			return fmt.Errorf("%s: $between wants [low, high]", path)
		}
		lo, ok1 := number(r[0])
		hi, ok2 := number(r[1])
		g, ok3 := number(got)
		if !ok1 || !ok2 || !ok3 {
			return fmt.Errorf("%s: got %s, want between %v and %v", path, show(got), r[0], r[1])
		}
		if g < lo || g > hi {
			return fmt.Errorf("%s: got %s, want between %v and %v", path, show(got), r[0], r[1])
		}
		return nil
	}
	return fmt.Errorf("%s: unknown operator %s", path, op)
}

// number reads numbers, numeric strings and durations (as nanoseconds).
func number(v any) (float64, bool) {
	switch n := v.(type) {
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case uint64:
		return float64(n), true
	case float64:
		return n, true
	case string:
		if f, err := strconv.ParseFloat(n, 64); err == nil {
			return f, true
		}
		if d, err := time.ParseDuration(n); err == nil {
			return float64(d), true
		}
		if s, err := parseSize(n); err == nil {
			return float64(s), true
		}
	}
	return 0, false
}

func unset(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Map, reflect.Slice, reflect.String:
		return rv.Len() == 0
	}
	return rv.IsZero()
}

// show prints a received value briefly.
func show(v any) string {
	s := fmt.Sprintf("%v", v)
	switch v := v.(type) {
	case string:
		s = strconv.Quote(v)
	case nil:
		s = "unset"
	}
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}
