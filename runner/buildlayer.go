package runner

import (
	"context"
	"errors"
)

// prepareBuildLayer makes (or finds) the build-tree layer of a Meson build
// directory. Placeholder until images/layer lands.
func prepareBuildLayer(ctx context.Context, env *cliEnv, buildDir string, logf func(string, ...any)) (string, func(), error) {
	return "", nil, errors.New("--build-dir is not implemented yet")
}
