package images

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"time"
)

// userNamespace runs commands as root of a user namespace in which the
// caller's own uid and gid are 0 and its subordinate ids (/etc/subuid,
// /etc/subgid) are 1 to count. That is the view a rootless build needs of
// the tree mmdebstrap's unshare mode writes as a tarball: tar, run there,
// restores every file's owner, group, mode and extended attributes
// (security.capability included) as a root build has them, and mke2fs -d,
// run there, copies them into the ext4 image. Files owned by root in the
// tree are the caller's own files on the host, so the image it writes
// belongs to the caller; files of other owners belong to subordinate ids,
// which only a process in such a namespace can remove.
//
// The namespace is made by util-linux's unshare (2.38 or later, for
// --map-users), which calls the setuid newuidmap and newgidmap (package
// uidmap) to install the subordinate ranges.
type userNamespace struct {
	unshare string
	uid     subIDRange
	gid     subIDRange
}

// subIDRange is one line of /etc/subuid or /etc/subgid.
type subIDRange struct {
	start, count int
}

// newUserNamespace finds the caller's subordinate ids and checks, by
// entering such a namespace once, that it can be made here.
func newUserNamespace(ctx context.Context) (*userNamespace, error) {
	unshare, err := findTool("unshare", "install it with apt-get install util-linux")
	if err != nil {
		return nil, err
	}
	u, err := user.Current()
	if err != nil {
		return nil, fmt.Errorf("building an image without root: who am I: %w", err)
	}
	uid, err := readSubIDs("/etc/subuid", u.Username, u.Uid)
	if err != nil {
		return nil, err
	}
	gid, err := readSubIDs("/etc/subgid", u.Username, u.Uid)
	if err != nil {
		return nil, err
	}
	ns := &userNamespace{unshare: unshare, uid: uid, gid: gid}
	probe, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(probe, unshare, ns.args("id", "-u")...).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "0" {
		return nil, fmt.Errorf("building an image without root needs a user namespace with the subordinate ids of %s, "+
			"which `unshare --map-root-user --map-users=%d,1,%d --map-groups=%d,1,%d` could not make (%v: %s): "+
			"it needs util-linux 2.38 or later, newuidmap and newgidmap (apt-get install uidmap) and unprivileged user namespaces",
			u.Username, uid.start, uid.count, gid.start, gid.count, err, strings.TrimSpace(string(out)))
	}
	return ns, nil
}

// args is unshare's command line for running argv in the namespace.
func (ns *userNamespace) args(argv ...string) []string {
	return append([]string{
		"--map-root-user",
		fmt.Sprintf("--map-users=%d,1,%d", ns.uid.start, ns.uid.count),
		fmt.Sprintf("--map-groups=%d,1,%d", ns.gid.start, ns.gid.count),
		"--",
	}, argv...)
}

// maps says whether uid and gid have a name in the namespace.
func (ns *userNamespace) maps(uid, gid int) bool {
	return uid >= 0 && uid <= ns.uid.count && gid >= 0 && gid <= ns.gid.count
}

// removeAll removes a tree that may hold files of subordinate ids.
func (ns *userNamespace) removeAll(dir string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, ns.unshare, ns.args("rm", "-rf", "--", dir)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("remove %s in a user namespace: %w: %s", dir, err, bytes.TrimSpace(out))
	}
	return nil
}

// readSubIDs returns the first range of path that belongs to the user
// (by name or by uid), as newuidmap and mmdebstrap read it.
func readSubIDs(path, name, uid string) (subIDRange, error) {
	f, err := os.Open(path)
	if err != nil {
		return subIDRange{}, subIDHint(path, name, err.Error())
	}
	defer f.Close()
	r, err := parseSubIDs(f, name, uid)
	if err != nil {
		return subIDRange{}, subIDHint(path, name, err.Error())
	}
	return r, nil
}

func subIDHint(path, name, why string) error {
	return fmt.Errorf("building an image without root needs subordinate ids for %s in %s (%s): "+
		"ask an administrator to give it 65536 ids no other user has in both files, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 %s`, or build as root",
		name, path, why, name)
}

// minSubIDs is the smallest range a Debian tree fits in: its ids go up to
// 65534 (nobody).
const minSubIDs = 65534

// parseSubIDs reads subuid(5)/subgid(5) lines, name:start:count.
func parseSubIDs(r io.Reader, name, uid string) (subIDRange, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) != 3 || (fields[0] != name && fields[0] != uid) {
			continue
		}
		start, err1 := strconv.Atoi(fields[1])
		count, err2 := strconv.Atoi(fields[2])
		if err1 != nil || err2 != nil || start <= 0 || count <= 0 {
			return subIDRange{}, fmt.Errorf("malformed line %q", line)
		}
		if count < minSubIDs {
			return subIDRange{}, fmt.Errorf("the range %s has %d ids, fewer than the %d a Debian tree needs", line, count, minSubIDs)
		}
		return subIDRange{start: start, count: count}, nil
	}
	if err := sc.Err(); err != nil {
		return subIDRange{}, err
	}
	return subIDRange{}, fmt.Errorf("no line for %s", name)
}
