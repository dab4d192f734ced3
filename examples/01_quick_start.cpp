// Quick start: ALiBi attention over your own [batch, seq, heads, dim] memory.
#include <relbias/relbias.hpp>

#include <cstdio>
#include <vector>

int main() {
  const relbias::index_t batch = 1, seq = 6, heads = 4, dim = 8;
  std::vector<float> q(batch * seq * heads * dim), k(q.size()), v(q.size()), o(q.size());
  for (std::size_t n = 0; n < q.size(); ++n) {
    q[n] = float(n % 7) / 7.0f;
    k[n] = float(n % 5) / 5.0f;
    v[n] = float(n % 3);
  }

  const relbias::alibi<float> bias{heads};  // slopes 1/4, 1/16, 1/64, 1/256
  const relbias::attention_options<float> options{.mask = relbias::masking::causal};
  relbias::attention(relbias::bshd(q.data(), batch, seq, heads, dim), relbias::bshd(k.data(), batch, seq, heads, dim),
                     relbias::bshd(v.data(), batch, seq, heads, dim), bias, options,
                     relbias::bshd(o.data(), batch, seq, heads, dim));

  // The first query sees only the first key, so its output is that key's value row.
  std::printf("o[0, 0, 0, :3] = %.3f %.3f %.3f (v[0, 0, 0, :3] = %.3f %.3f %.3f)\n", o[0], o[1], o[2], v[0], v[1], v[2]);
  return o[0] == v[0] && o[1] == v[1] ? 0 : 1;
}
