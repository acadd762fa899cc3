#include <stdio.h>

int main(void) {
    puts("hello from a velo tree");
    return 0;
}
