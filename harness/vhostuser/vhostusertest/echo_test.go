package vhostusertest

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCopyChain(t *testing.T) {
	tests := []struct {
		name    string
		dst     []int
		src     []string
		want    []string
		wantLen int
	}{
		{"one to one", []int{5}, []string{"hello"}, []string{"hello"}, 5},
		{"split source", []int{8}, []string{"ab", "cd"}, []string{"abcd\x00\x00\x00\x00"}, 4},
		{"split destination", []int{2, 3}, []string{"hello"}, []string{"he", "llo"}, 5},
		{"truncated", []int{3}, []string{"hello"}, []string{"hel"}, 3},
		{"empty destination buffer skipped", []int{0, 5}, []string{"hello"}, []string{"", "hello"}, 5},
		{"nothing to copy", []int{4}, nil, []string{"\x00\x00\x00\x00"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var dst [][]byte
			for _, n := range tt.dst {
				dst = append(dst, make([]byte, n))
			}
			var src [][]byte
			for _, s := range tt.src {
				src = append(src, []byte(s))
			}
			assert.Equal(t, tt.wantLen, copyChain(dst, src))
			for i, w := range tt.want {
				assert.Equal(t, w, string(dst[i]))
			}
		})
	}
}
