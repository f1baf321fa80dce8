package examples_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestREADME checks that every Go snippet of the repository's README and
// of docs/operators.md is a piece of the code of examples/ or go/
// (indentation aside), so that the docs only show code that compiles and
// that the examples and tests run. The README's Rust snippets are checked
// against sdk/rust the same way (sdk/python's tests check the Python ones).
func TestREADME(t *testing.T) {
	goSources := sourceLines(t, ".go", ".", filepath.Join("..", "go"))
	for _, doc := range []string{"README.md", filepath.Join("docs", "operators.md")} {
		checkSnippets(t, doc, "go", goSources)
	}
	checkSnippets(t, "README.md", "rust", sourceLines(t, ".rs", filepath.Join("..", "sdk", "rust")))
}

// checkSnippets fails the test for each ```lang block of doc found in none
// of sources.
func checkSnippets(t *testing.T, doc, lang string, sources [][]string) {
	t.Helper()
	md, err := os.ReadFile(filepath.Join("..", doc))
	if err != nil {
		t.Fatal(err)
	}
	snippets := fenced(string(md), lang)
	if len(snippets) == 0 {
		t.Fatalf("no %s snippet in %s", lang, doc)
	}
	for _, snippet := range snippets {
		want := trimmedLines(snippet)
		if !slices.ContainsFunc(sources, func(src []string) bool { return containsRun(src, want) }) {
			t.Errorf("%s shows %s code found in no source file:\n%s", doc, lang, snippet)
		}
	}
}

// sourceLines returns the trimmed lines of each file named *ext under the
// roots, build output aside.
func sourceLines(t *testing.T, ext string, roots ...string) [][]string {
	t.Helper()
	var sources [][]string
	for _, root := range roots {
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && d.Name() == "target" {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(path, ext) {
				return nil
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sources = append(sources, trimmedLines(string(b)))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return sources
}

// fenced returns the contents of the markdown's ```lang blocks.
func fenced(md, lang string) []string {
	var out []string
	for _, block := range strings.Split(md, "```"+lang+"\n")[1:] {
		end := strings.Index(block, "```")
		if end < 0 {
			break
		}
		out = append(out, block[:end])
	}
	return out
}

func trimmedLines(s string) []string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimSpace(l)
	}
	return lines
}

// containsRun reports whether want appears in lines as consecutive lines.
func containsRun(lines, want []string) bool {
	for i := 0; i+len(want) <= len(lines); i++ {
		if slices.Equal(lines[i:i+len(want)], want) {
			return true
		}
	}
	return false
}
