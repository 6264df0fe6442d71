package images

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOpen(t *testing.T) {
	tests := []struct {
		name          string
		manifest      string // "" for none
		files         []string
		wantKernelELF string // file name, "" for none
		wantErr       string
	}{
		{name: "no manifest: the plain files",
			files: []string{"vmlinuz", "initrd.img", "rootfs.img"}},
		{name: "a manifest without a PVH kernel (built before format 3)",
			manifest: `{"kernel":"vmlinuz","initrd":"initrd.img","rootfs":"rootfs.img"}`,
			files:    []string{"vmlinuz", "initrd.img", "rootfs.img", "vmlinux"}},
		{name: "a manifest with a PVH kernel",
			manifest:      `{"kernel":"vmlinuz","kernel_elf":"vmlinux","initrd":"initrd.img","rootfs":"rootfs.img"}`,
			files:         []string{"vmlinuz", "initrd.img", "rootfs.img", "vmlinux"},
			wantKernelELF: "vmlinux"},
		{name: "the PVH kernel is missing",
			manifest: `{"kernel":"vmlinuz","kernel_elf":"vmlinux","initrd":"initrd.img","rootfs":"rootfs.img"}`,
			files:    []string{"vmlinuz", "initrd.img", "rootfs.img"},
			wantErr:  "vmlinux: no such file or directory"},
		{name: "the PVH kernel is named by a path",
			manifest: `{"kernel":"vmlinuz","kernel_elf":"../vmlinux","initrd":"initrd.img","rootfs":"rootfs.img"}`,
			files:    []string{"vmlinuz", "initrd.img", "rootfs.img"},
			wantErr:  `names file "../vmlinux": want a plain file name`},
		{name: "no rootfs",
			files:   []string{"vmlinuz", "initrd.img"},
			wantErr: "rootfs.img: no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range tt.files {
				require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644))
			}
			if tt.manifest != "" {
				require.NoError(t, os.WriteFile(filepath.Join(dir, ManifestFile), []byte(tt.manifest), 0o644))
			}
			img, err := Open(dir)
			if tt.wantErr != "" {
				assert.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, filepath.Join(dir, "vmlinuz"), img.Kernel)
			want := ""
			if tt.wantKernelELF != "" {
				want = filepath.Join(dir, tt.wantKernelELF)
			}
			assert.Equal(t, want, img.KernelELF)
		})
	}
}
