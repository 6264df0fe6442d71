package images

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestUserEnv names the unprivileged user (with subordinate ids) the
// root-versus-rootless comparison builds as.
const testUserEnv = "VMHARNESS_TEST_USER"

// TestRootlessBuildMatchesRootE2E builds images/testdata/rootless twice,
// at the same time: as root in this process (mmdebstrap --mode=root,
// mkfs.ext4 -d on the tree) and as the unprivileged user named by
// $VMHARNESS_TEST_USER through `vmharness image build` (the rootless path).
// Every path of the two rootfs.img must agree on type, mode, owner, group,
// link count, symlink target, device numbers and extended attributes; the
// recipe has what ownership can get wrong (a 0700 home of another user, a
// setuid program, 0700 and 0600 files, capabilities that packages'
// postinst scripts set with setcap, device nodes, fast and slow symlinks).
// It reads the images with debugfs, unmounted.
func TestRootlessBuildMatchesRootE2E(t *testing.T) {
	if os.Getenv("VMHARNESS_E2E") != "1" {
		t.Skip("set VMHARNESS_E2E=1 to build a recipe as root and as a user and compare the images (needs network, takes minutes)")
	}
	if os.Geteuid() != 0 {
		t.Skip("builds the recipe as root too: run as root with " + testUserEnv + " naming a user with subordinate ids (scripts/test does)")
	}
	name := os.Getenv(testUserEnv)
	if name == "" {
		t.Skip("set " + testUserEnv + " to an unprivileged user with subordinate ids to compare a rootless build with a root build (scripts/test does)")
	}
	u, err := user.Lookup(name)
	require.NoError(t, err)
	uid, err := strconv.Atoi(u.Uid)
	require.NoError(t, err)
	gid, err := strconv.Atoi(u.Gid)
	require.NoError(t, err)
	require.NotZero(t, uid, "%s must not be root", name)
	debugfs, err := findTool("debugfs", "")
	require.NoError(t, err)
	runuser, err := findTool("runuser", "")
	require.NoError(t, err)

	// Everything the user reads lies in one world-readable directory.
	work, err := os.MkdirTemp("", "vmharness-rootless-e2e-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = removeTree(work) })
	require.NoError(t, os.Chmod(work, 0o755))
	recipeDir := filepath.Join(work, "recipe")
	out, err := exec.Command("cp", "-r", filepath.Join("testdata", "rootless"), recipeDir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	out, err = exec.Command("chmod", "-R", "a+rX", recipeDir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	recipePath := filepath.Join(recipeDir, "recipe.json")
	bin := filepath.Join(work, "vmharness")
	out, err = exec.Command("go", "build", "-o", bin, "..").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	userCache := filepath.Join(work, "user-cache")
	require.NoError(t, os.Mkdir(userCache, 0o755))
	require.NoError(t, os.Chown(userCache, uid, gid))

	r, err := LoadRecipe(recipePath)
	require.NoError(t, err)
	type result struct {
		img     *Image
		err     error
		log     string
		elapsed time.Duration
	}
	rootDone := make(chan result, 1)
	go func() {
		start := time.Now()
		var progress syncBuffer
		img, err := NewBuilder(filepath.Join(work, "root-cache"), &progress).Ensure(context.Background(), r)
		rootDone <- result{img, err, progress.String(), time.Since(start)}
	}()

	start := time.Now()
	cmd := exec.Command(runuser, "-u", name, "--", "env", "-i",
		"PATH="+os.Getenv("PATH"), "HOME="+u.HomeDir, "TMPDIR=/tmp", "LANG=C.UTF-8",
		CacheDirEnv+"="+userCache, bin, "image", "build", "--recipe", recipePath)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	userErr := cmd.Run()
	userElapsed := time.Since(start)
	root := <-rootDone
	t.Logf("root build (%s):\n%s", root.elapsed.Round(time.Second), root.log)
	t.Logf("rootless build as %s (%s):\n%s", name, userElapsed.Round(time.Second), stderr.String())
	require.NoError(t, root.err)
	require.NoError(t, userErr)

	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	userImg, err := Open(lines[len(lines)-1])
	require.NoError(t, err)
	assert.Equal(t, "root", root.img.Manifest.BuildMode)
	assert.Equal(t, "unshare", userImg.Manifest.BuildMode)
	assert.Equal(t, root.img.Manifest.Key, userImg.Manifest.Key, "one recipe, one key")
	assert.Equal(t, root.img.Manifest.Packages, userImg.Manifest.Packages, "the same package versions went in")

	// Everything of the user's build belongs to the user, and nothing of
	// the build (a tree of subordinate ids, a temporary directory) is left.
	require.NoError(t, filepath.WalkDir(userCache, func(p string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		info, err := d.Info()
		require.NoError(t, err)
		st := info.Sys().(*syscall.Stat_t)
		assert.Equal(t, uint32(uid), st.Uid, "%s is owned by the user", p)
		assert.NotContains(t, d.Name(), ".tmp-", "leftover of the build: %s", p)
		return nil
	}))

	rootList := listExt4(t, debugfs, root.img.Rootfs)
	userList := listExt4(t, debugfs, userImg.Rootfs)
	t.Logf("%d paths in the root build's image, %d in the rootless one", len(rootList), len(userList))
	require.Greater(t, len(rootList), 5000, "a Debian tree, not an empty image")
	diffs := diffExt4(rootList, userList)
	if len(diffs) > 50 {
		diffs = append(diffs[:50], "...")
	}
	assert.Empty(t, diffs, "paths where the root build (first) and the rootless build (second) differ:\n%s", strings.Join(diffs, "\n"))

	// What the comparison must have covered, seen in the rootless image.
	for p, want := range map[string]func(ext4Entry) bool{
		// iputils-arping's postinst runs setcap cap_net_raw+ep and drops the setuid bit.
		"/usr/bin/arping": func(e ext4Entry) bool {
			return e.Mode == 0o100755 && strings.Contains(e.Xattrs, "security.capability (20) = 01 00 00 02 00 20 00 00")
		},
		"/usr/bin/clockdiff":                 func(e ext4Entry) bool { return strings.Contains(e.Xattrs, "security.capability") },
		"/dev/null":                          func(e ext4Entry) bool { return e.Mode == 0o20666 && e.Device == "01:03" },
		"/home/testuser":                     func(e ext4Entry) bool { return e.Mode == 0o40700 && e.UID == 4711 && e.GID == 4711 },
		"/usr/bin/su":                        func(e ext4Entry) bool { return e.Mode == 0o104755 && e.UID == 0 },
		"/usr/local/bin/vmharness-private":   func(e ext4Entry) bool { return e.Mode == 0o100700 && e.UID == 0 },
		"/etc/vmharness-secret":              func(e ext4Entry) bool { return e.Mode == 0o100600 },
		"/etc/vmharness-link":                func(e ext4Entry) bool { return e.Target == "/usr/lib/os-release" },
		"/usr/local/lib/vmharness-long-link": func(e ext4Entry) bool { return strings.HasSuffix(e.Target, "/in/the/inode/itself") },
	} {
		e, ok := userList[p]
		if assert.True(t, ok, "%s in the rootless image", p) {
			assert.True(t, want(e), "%s in the rootless image: %s", p, e)
		}
	}
}
