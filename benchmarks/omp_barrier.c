/* What an OpenMP barrier costs on this machine, under the current OMP_WAIT_POLICY (issue #4).
 *
 *   gcc -O2 -fopenmp benchmarks/omp_barrier.c -o /tmp/omp_barrier
 *   OMP_WAIT_POLICY=PASSIVE /tmp/omp_barrier; OMP_WAIT_POLICY=ACTIVE /tmp/omp_barrier
 *
 * Inductor's CPU kernels run their loop nests in one `#pragma omp parallel` region: each
 * `omp for` ends with a barrier, and so does each `omp single` (a 0-d nest such as a bias
 * correction). Here a parallel region holds 0 to 64 empty `omp single` blocks, with a 200 us
 * pause between regions (a step's Python and library calls), as between a step's kernels.
 * The fastest of 200 regions is printed: the cost of opening one, and of each barrier in it.
 */
#include <omp.h>
#include <stdio.h>

static volatile float sink;

int main(void) {
    for (int barriers = 0; barriers <= 64; barriers += 16) {
        double fastest = 1e9;
        for (int rep = 0; rep < 200; rep++) {
            double start = omp_get_wtime();
#pragma omp parallel
            {
                for (int i = 0; i < barriers; i++) {
#pragma omp single
                    { sink = sink + 1.0f; }
                }
            }
            double seconds = omp_get_wtime() - start;
            if (rep >= 5 && seconds < fastest) fastest = seconds;
            double pause = omp_get_wtime();
            while (omp_get_wtime() - pause < 200e-6) {
            }
        }
        printf("%2d barriers in a region: %7.1f us (%d threads)\n", barriers, fastest * 1e6, omp_get_max_threads());
    }
    return 0;
}
